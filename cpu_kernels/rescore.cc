// The winners' TDQKR scores from their slot ids (ultramem_jax/key_search.py: rescore), forward and backward.
//
//   s_row = K_row[row]^T q_row,  s_col = K_col[col]^T q_col  (R rank scores each),  score_c = s_row^T C_c s_col
//
// XLA's CPU backend runs the reference as two gathers of T*H*M*D*R key entries, transposing copies and
// batched matmuls with R = 2 columns; here each winner's two R x D key blocks are read once, forward and
// backward. The key and core gradients are summed per part, then the parts in a fixed order.
#include <cstring>
#include <vector>

#include "parallel.h"

namespace ffi = xla::ffi;

namespace ultramem {
namespace {

// Keys arrive rank-major (H x N x R x D, the wrapper's transpose of the reference's H x N x D x R), so that
// every rank score is a contiguous D-long dot product and every key gradient a contiguous axpy.
struct Shapes {
  int64_t T, H, D, N, R, C, M;
};

Shapes shapes_of(const ffi::Buffer<ffi::F32>& q_row, const ffi::Buffer<ffi::F32>& k_row,
                 const ffi::Buffer<ffi::F32>& cores, const ffi::Buffer<ffi::S32>& slots) {
  return {q_row.dimensions()[0], q_row.dimensions()[1], q_row.dimensions()[2], k_row.dimensions()[1],
          k_row.dimensions()[2], cores.dimensions()[0], slots.dimensions()[2]};
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// s[a] = <q, k[a]> for the R rank rows of one key
inline void rank_scores(const float* q, const float* k, const Shapes& s, float* out) {
  for (int64_t a = 0; a < s.R; ++a) out[a] = dot(q, k + a * s.D, s.D);
}

ffi::Error RescoreForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_row, ffi::Buffer<ffi::F32> q_col,
                          ffi::Buffer<ffi::F32> k_row, ffi::Buffer<ffi::F32> k_col, ffi::Buffer<ffi::F32> cores,
                          ffi::Buffer<ffi::S32> slots, ffi::ResultBuffer<ffi::F32> scores) {
  const Shapes s = shapes_of(q_row, k_row, cores, slots);
  const float *Qr = q_row.typed_data(), *Qc = q_col.typed_data(), *Kr = k_row.typed_data(),
              *Kc = k_col.typed_data(), *Cw = cores.typed_data();
  const int32_t* ids = slots.typed_data();
  float* out = scores->typed_data();
  const int64_t key_block = s.R * s.D;
  parallel_for(pool, s.T, num_parts(pool, s.T), [&](int64_t, int64_t t0, int64_t t1) {
    std::vector<float> sr(s.R), sc(s.R);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t m = 0; m < s.M; ++m) {
          const int64_t i = (t * s.H + h) * s.M + m, slot = clamp_id(ids[i], s.N * s.N);
          rank_scores(Qr + (t * s.H + h) * s.D, Kr + (h * s.N + slot / s.N) * key_block, s, sr.data());
          rank_scores(Qc + (t * s.H + h) * s.D, Kc + (h * s.N + slot % s.N) * key_block, s, sc.data());
          for (int64_t c = 0; c < s.C; ++c) {
            const float* core = Cw + (c * s.H + h) * s.R * s.R;
            float acc = 0.f;
            for (int64_t a = 0; a < s.R; ++a)
              for (int64_t b = 0; b < s.R; ++b) acc += sr[a] * core[a * s.R + b] * sc[b];
            out[i * s.C + c] = acc;
          }
        }
  });
  return ffi::Error::Success();
}

ffi::Error RescoreBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_row, ffi::Buffer<ffi::F32> q_col,
                           ffi::Buffer<ffi::F32> k_row, ffi::Buffer<ffi::F32> k_col, ffi::Buffer<ffi::F32> cores,
                           ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> d_scores,
                           ffi::ResultBuffer<ffi::F32> d_q_row, ffi::ResultBuffer<ffi::F32> d_q_col,
                           ffi::ResultBuffer<ffi::F32> d_k_row, ffi::ResultBuffer<ffi::F32> d_k_col,
                           ffi::ResultBuffer<ffi::F32> d_cores) {
  const Shapes s = shapes_of(q_row, k_row, cores, slots);
  const float *Qr = q_row.typed_data(), *Qc = q_col.typed_data(), *Kr = k_row.typed_data(),
              *Kc = k_col.typed_data(), *Cw = cores.typed_data(), *G = d_scores.typed_data();
  const int32_t* ids = slots.typed_data();
  const int64_t key_block = s.R * s.D, keys_size = s.H * s.N * key_block, cores_size = s.C * s.H * s.R * s.R;
  const int64_t parts = num_parts(pool, s.T);
  // part 0 accumulates into the outputs, the others into their own copies, summed below in part order
  std::vector<std::vector<float>> own(parts - 1, std::vector<float>(2 * keys_size + cores_size, 0.f));
  float *dKr0 = d_k_row->typed_data(), *dKc0 = d_k_col->typed_data(), *dC0 = d_cores->typed_data();
  std::memset(dKr0, 0, sizeof(float) * keys_size);
  std::memset(dKc0, 0, sizeof(float) * keys_size);
  std::memset(dC0, 0, sizeof(float) * cores_size);
  parallel_for(pool, s.T, parts, [&](int64_t part, int64_t t0, int64_t t1) {
    float* dKr = part ? own[part - 1].data() : dKr0;
    float* dKc = part ? dKr + keys_size : dKc0;
    float* dC = part ? dKr + 2 * keys_size : dC0;
    std::vector<float> sr(s.R), sc(s.R), dsr(s.R), dsc(s.R);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < s.H; ++h) {
        const int64_t th = t * s.H + h;
        const float *qr = Qr + th * s.D, *qc = Qc + th * s.D;
        float *dqr = d_q_row->typed_data() + th * s.D, *dqc = d_q_col->typed_data() + th * s.D;
        std::memset(dqr, 0, sizeof(float) * s.D);
        std::memset(dqc, 0, sizeof(float) * s.D);
        for (int64_t m = 0; m < s.M; ++m) {
          const int64_t i = th * s.M + m, slot = clamp_id(ids[i], s.N * s.N);
          const int64_t kr_at = (h * s.N + slot / s.N) * key_block, kc_at = (h * s.N + slot % s.N) * key_block;
          rank_scores(qr, Kr + kr_at, s, sr.data());
          rank_scores(qc, Kc + kc_at, s, sc.data());
          for (int64_t a = 0; a < s.R; ++a) dsr[a] = dsc[a] = 0.f;
          for (int64_t c = 0; c < s.C; ++c) {
            const float g = G[i * s.C + c];
            const float* core = Cw + (c * s.H + h) * s.R * s.R;
            float* dcore = dC + (c * s.H + h) * s.R * s.R;
            for (int64_t a = 0; a < s.R; ++a)
              for (int64_t b = 0; b < s.R; ++b) {
                dsr[a] += g * core[a * s.R + b] * sc[b];
                dsc[b] += g * sr[a] * core[a * s.R + b];
                dcore[a * s.R + b] += g * sr[a] * sc[b];
              }
          }
          for (int64_t a = 0; a < s.R; ++a) {
            axpy(dsr[a], Kr + kr_at + a * s.D, dqr, s.D);
            axpy(dsc[a], Kc + kc_at + a * s.D, dqc, s.D);
            axpy(dsr[a], qr, dKr + kr_at + a * s.D, s.D);
            axpy(dsc[a], qc, dKc + kc_at + a * s.D, s.D);
          }
        }
      }
  });
  for (int64_t p = 0; p + 1 < parts; ++p) {
    const float* src = own[p].data();
    axpy(1.f, src, dKr0, keys_size);
    axpy(1.f, src + keys_size, dKc0, keys_size);
    axpy(1.f, src + 2 * keys_size, dC0, cores_size);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ultramem

XLA_FFI_DEFINE_HANDLER_SYMBOL(UltramemRescoreForward, ultramem::RescoreForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_row T x H x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_col T x H x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_row H x N x R x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_col H x N x R x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cores C x H x R x R
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots T x H x M
                                  .Ret<ffi::Buffer<ffi::F32>>());  // scores T x H x M x C

XLA_FFI_DEFINE_HANDLER_SYMBOL(UltramemRescoreBackward, ultramem::RescoreBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_scores T x H x M x C
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q_row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q_col
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k_row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k_col
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_cores
