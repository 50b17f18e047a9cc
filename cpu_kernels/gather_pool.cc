// The IVE weighted gather-pool (ultramem_jax/ive.py: gather_pool), forward and backward, on the CPU.
//
//   pooled[t, p, slice c] = sum_{k: blocks[t,k] = p} scores[t,k,c] * values[rows[t,k], slice c]
//
// XLA's CPU backend runs the reference as a T*K*D gather, a transposing copy, a batched one-hot matmul and,
// backward, a scatter-add into zeros, each a separate pass over memory; here each selected row is read once,
// straight into its token's pooled block.
#include <cstring>

#include "parallel.h"

namespace ffi = xla::ffi;

namespace ultramem {
namespace {

ffi::Error GatherPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> rows,
                             ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::F32> scores,
                             ffi::ResultBuffer<ffi::F32> pooled) {
  const int64_t N = values.dimensions()[0], D = values.dimensions()[1];
  const int64_t T = scores.dimensions()[0], K = scores.dimensions()[1], C = scores.dimensions()[2];
  const int64_t E = pooled->dimensions()[1], width = D / C;
  const float* V = values.typed_data();
  const int32_t* row_ids = rows.typed_data();
  const int32_t* block_ids = blocks.typed_data();
  const float* S = scores.typed_data();
  float* out = pooled->typed_data();
  parallel_for(pool, T, num_parts(pool, T), [&](int64_t, int64_t t0, int64_t t1) {
    std::memset(out + t0 * E * D, 0, sizeof(float) * (t1 - t0) * E * D);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = t * K + k;
        const float* v = V + clamp_id(row_ids[i], N) * D;
        float* o = out + (t * E + clamp_id(block_ids[i], E)) * D;
        for (int64_t c = 0; c < C; ++c) {
          const float s = S[i * C + c];
          for (int64_t j = c * width; j < (c + 1) * width; ++j) o[j] += s * v[j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// d_scores[t,k,c] = <d_pooled[t, block, slice c], values[row, slice c]>;  d_values[row] += score * d_pooled.
// d_values is the dense N x D table gradient (the dense value update's); each part owns a range of its rows,
// so the scatter needs no atomics, at the price of every part scanning all T*K ids.
ffi::Error GatherPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> rows,
                              ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::F32> scores,
                              ffi::Buffer<ffi::F32> d_pooled, ffi::ResultBuffer<ffi::F32> d_values,
                              ffi::ResultBuffer<ffi::F32> d_scores) {
  const int64_t N = values.dimensions()[0], D = values.dimensions()[1];
  const int64_t T = scores.dimensions()[0], K = scores.dimensions()[1], C = scores.dimensions()[2];
  const int64_t E = d_pooled.dimensions()[1], width = D / C;
  const float* V = values.typed_data();
  const int32_t* row_ids = rows.typed_data();
  const int32_t* block_ids = blocks.typed_data();
  const float* S = scores.typed_data();
  const float* G = d_pooled.typed_data();
  float* dV = d_values->typed_data();
  float* dS = d_scores->typed_data();
  parallel_for(pool, T, num_parts(pool, T), [&](int64_t, int64_t t0, int64_t t1) {
    for (int64_t i = t0 * K; i < t1 * K; ++i) {
      const float* v = V + clamp_id(row_ids[i], N) * D;
      const float* g = G + (i / K * E + clamp_id(block_ids[i], E)) * D;
      for (int64_t c = 0; c < C; ++c) {
        float dot = 0.f;
        for (int64_t j = c * width; j < (c + 1) * width; ++j) dot += g[j] * v[j];
        dS[i * C + c] = dot;
      }
    }
  });
  parallel_for(pool, N, num_parts(pool, N), [&](int64_t, int64_t n0, int64_t n1) {
    std::memset(dV + n0 * D, 0, sizeof(float) * (n1 - n0) * D);
    for (int64_t i = 0; i < T * K; ++i) {
      const int64_t row = clamp_id(row_ids[i], N);
      if (row < n0 || row >= n1) continue;
      const float* g = G + (i / K * E + clamp_id(block_ids[i], E)) * D;
      float* dv = dV + row * D;
      for (int64_t c = 0; c < C; ++c) {
        const float s = S[i * C + c];
        for (int64_t j = c * width; j < (c + 1) * width; ++j) dv[j] += s * g[j];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ultramem

XLA_FFI_DEFINE_HANDLER_SYMBOL(UltramemGatherPoolForward, ultramem::GatherPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values N x D
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows T x K
                                  .Arg<ffi::Buffer<ffi::S32>>()  // blocks T x K
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores T x K x C
                                  .Ret<ffi::Buffer<ffi::F32>>());  // pooled T x E x D

XLA_FFI_DEFINE_HANDLER_SYMBOL(UltramemGatherPoolBackward, ultramem::GatherPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values N x D
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows T x K
                                  .Arg<ffi::Buffer<ffi::S32>>()  // blocks T x K
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores T x K x C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_pooled T x E x D
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_values N x D
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_scores T x K x C
