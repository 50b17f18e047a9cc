// The winners of the key search (ultramem_jax/key_search.py: select), without gradient, on the CPU.
//
//   pre-selection:  the P best row keys by  sum_a u[a] s_row[a]  and the P best column keys by  sum_b t[b] s_col[b]
//   grid:           g[i, j] = sum_ab s_row[a, i] Csum[a, b] s_col[b, j]   (additive: s_row[i] + s_col[j])
//   winners:        the M best of the P x P grid, slot = row * N + col
//
// Orders as lax.top_k: best first, ties to the lower index. XLA's CPU backend runs the reference as sorting
// networks over chunks of tokens; here a token's top-k keeps a sorted list of its best so far, and most
// candidates cost one comparison with the list's worst. The key scores of 8 tokens of a head are computed
// together, so each key entry is loaded once for the 8.
#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace ffi = xla::ffi;

namespace ultramem {
namespace {

// A score and its index as one integer that orders as lax.top_k does: a higher score first, then a lower index.
// No two keys are equal, so a key's rank is the number of keys above it.
inline uint64_t rank_key(float v, int32_t i) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits ^= static_cast<uint32_t>(-static_cast<int32_t>(bits >> 31)) | 0x80000000u;  // IEEE order as unsigned order
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~i);
}

inline int32_t index_of(uint64_t key) { return static_cast<int32_t>(~static_cast<uint32_t>(key)); }

// Indices of the k best of values[0, n) (k <= n), best first, into ids (k + 1 entries: the last is scratch).
// Without data-dependent branches (a sorted insertion list was slower on real scores, mispredicting):
//   1. a floor: the keys' maxima over the k strided groups {g, g + k, g + 2k, ...}; their minimum has at
//      least k keys at or above it (the k maxima), so every one of the top k is >= it;
//   2. the keys >= floor are compacted (on tiny-x12's shapes about 90-110 on average, of 408 keys at k = 32
//      and of the 1024-candidate grid at k = 16);
//   3. each survivor's rank is the count of survivors above it; ranks below k are written to their place.
// Other floors (per-lane top-t lists over 8 or 16 lanes, fewer survivors) measured slower in the train step.
// `keys` and `cand` hold n entries each.
void top_k(const float* values, int64_t n, int64_t k, uint64_t* keys, uint64_t* cand, int32_t* ids) {
  for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(values[i], static_cast<int32_t>(i));
  uint64_t* maxima = cand;  // k entries, free until step 2
  for (int64_t g = 0; g < k; ++g) maxima[g] = keys[g];
  for (int64_t r = k; r < n; r += k)
    for (int64_t g = 0; g < std::min(k, n - r); ++g) maxima[g] = std::max(maxima[g], keys[r + g]);
  uint64_t floor = maxima[0];
  for (int64_t g = 1; g < k; ++g) floor = std::min(floor, maxima[g]);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    cand[count] = keys[i];
    count += keys[i] >= floor;
  }
  for (int64_t a = 0; a < count; ++a) {
    const uint64_t key = cand[a];
    int64_t rank = 0;
    for (int64_t b = 0; b < count; ++b) rank += cand[b] > key;
    ids[std::min(rank, k)] = index_of(key);
  }
}

constexpr int64_t kTokens = 8;  // tokens scored together: each key entry loaded once for all of them
constexpr int64_t kLanes = 16;  // keys per accumulator block (the wrapper pads N to a multiple)

struct Dims {
  int64_t T, H, D, N, Npad, R, P, M;
};

// s[tt, a, n] = <q[tt], K[a, :, n]> for `count` tokens of one head and every key (K: R x D x Npad, keys
// contiguous): a register-blocked micro-kernel, kTokens x kLanes accumulators per block of keys.
void key_scores(const float* q, int64_t q_stride, int64_t count, const float* __restrict keys, const Dims& d,
                float* __restrict s) {
  for (int64_t a = 0; a < d.R; ++a)
    for (int64_t n0 = 0; n0 < d.Npad; n0 += kLanes) {
      float acc[kTokens][kLanes] = {};
      for (int64_t j = 0; j < d.D; ++j) {
        const float* __restrict k = keys + (a * d.D + j) * d.Npad + n0;
        for (int64_t tt = 0; tt < kTokens; ++tt) {
          const float w = tt < count ? q[tt * q_stride + j] : 0.f;
          for (int64_t l = 0; l < kLanes; ++l) acc[tt][l] += w * k[l];
        }
      }
      for (int64_t tt = 0; tt < count; ++tt)
        std::memcpy(s + (tt * d.R + a) * d.Npad + n0, acc[tt], sizeof(acc[tt]));
    }
}

// The P best keys of one side by sum_a dir[a] s[a, n], and their R rank scores (R x P)
void preselect_keys(const float* s, const float* dir, const Dims& d, float* pre, uint64_t* keys, uint64_t* cand,
                    int32_t* ids, float* picked) {
  for (int64_t n = 0; n < d.N; ++n) pre[n] = 0.f;
  for (int64_t a = 0; a < d.R; ++a)
    for (int64_t n = 0; n < d.N; ++n) pre[n] += dir[a] * s[a * d.Npad + n];
  top_k(pre, d.N, d.P, keys, cand, ids);
  for (int64_t a = 0; a < d.R; ++a)
    for (int64_t i = 0; i < d.P; ++i) picked[a * d.P + i] = s[a * d.Npad + ids[i]];
}

ffi::Error SelectForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_row, ffi::Buffer<ffi::F32> q_col,
                         ffi::Buffer<ffi::F32> k_row, ffi::Buffer<ffi::F32> k_col, ffi::Buffer<ffi::F32> core_sum,
                         ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> t, int64_t num_keys, int64_t preselect,
                         int64_t topk, bool additive, ffi::ResultBuffer<ffi::S32> slots) {
  const Dims d{q_row.dimensions()[0], q_row.dimensions()[1], q_row.dimensions()[2], num_keys,
               k_row.dimensions()[3], k_row.dimensions()[1], preselect, topk};
  if (d.Npad % kLanes || d.N > d.Npad || d.P < 1 || d.P > d.N || d.M < 1 || d.M > d.P * d.P)
    return ffi::Error::InvalidArgument("select: need keys padded to 16 and 1 <= topk <= preselect^2, "
                                       "1 <= preselect <= keys");
  const float *Qr = q_row.typed_data(), *Qc = q_col.typed_data(), *Kr = k_row.typed_data(),
              *Kc = k_col.typed_data(), *Cs = core_sum.typed_data(), *U = u.typed_data(), *Tt = t.typed_data();
  int32_t* out = slots->typed_data();
  const int64_t key_table = d.R * d.D * d.Npad, tiles = (d.T + kTokens - 1) / kTokens;
  // parts split (head, token tile) pairs: a tile shares one head's keys
  parallel_for(pool, d.H * tiles, num_parts(pool, d.H * tiles), [&](int64_t, int64_t w0, int64_t w1) {
    std::vector<float> s_row(kTokens * d.R * d.Npad), s_col(kTokens * d.R * d.Npad), pre(d.N),
        row_s(d.R * d.P), col_s(d.R * d.P), weight(d.R * d.P), grid(d.P * d.P);
    std::vector<uint64_t> keys(std::max(d.N, d.P * d.P)), cand(std::max(d.N, d.P * d.P));
    std::vector<int32_t> rows(d.P + 1), cols(d.P + 1), flat(d.M + 1);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w / tiles, tok0 = (w % tiles) * kTokens, count = std::min(kTokens, d.T - tok0);
      key_scores(Qr + (tok0 * d.H + h) * d.D, d.H * d.D, count, Kr + h * key_table, d, s_row.data());
      key_scores(Qc + (tok0 * d.H + h) * d.D, d.H * d.D, count, Kc + h * key_table, d, s_col.data());
      for (int64_t tt = 0; tt < count; ++tt) {
        const int64_t th = (tok0 + tt) * d.H + h;
        preselect_keys(s_row.data() + tt * d.R * d.Npad, U + h * d.R, d, pre.data(), keys.data(), cand.data(), rows.data(),
                       row_s.data());
        preselect_keys(s_col.data() + tt * d.R * d.Npad, Tt + h * d.R, d, pre.data(), keys.data(),
                       cand.data(), cols.data(), col_s.data());
        if (additive) {
          for (int64_t i = 0; i < d.P; ++i)
            for (int64_t j = 0; j < d.P; ++j) grid[i * d.P + j] = row_s[i] + col_s[j];
        } else {  // weight[b, i] = sum_a s_row[a, i] Csum[a, b];  g[i, j] = sum_b weight[b, i] s_col[b, j]
          const float* c = Cs + h * d.R * d.R;
          for (int64_t b = 0; b < d.R; ++b)
            for (int64_t i = 0; i < d.P; ++i) {
              float acc = 0.f;
              for (int64_t a = 0; a < d.R; ++a) acc += row_s[a * d.P + i] * c[a * d.R + b];
              weight[b * d.P + i] = acc;
            }
          for (int64_t i = 0; i < d.P; ++i) {
            float* __restrict g = grid.data() + i * d.P;
            for (int64_t j = 0; j < d.P; ++j) g[j] = 0.f;
            for (int64_t b = 0; b < d.R; ++b) {
              const float wb = weight[b * d.P + i];
              const float* __restrict sc = col_s.data() + b * d.P;
              for (int64_t j = 0; j < d.P; ++j) g[j] += wb * sc[j];
            }
          }
        }
        top_k(grid.data(), d.P * d.P, d.M, keys.data(), cand.data(), flat.data());
        for (int64_t m = 0; m < d.M; ++m)
          out[th * d.M + m] = rows[flat[m] / d.P] * static_cast<int32_t>(d.N) + cols[flat[m] % d.P];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace ultramem

XLA_FFI_DEFINE_HANDLER_SYMBOL(UltramemSelect, ultramem::SelectForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_row T x H x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_col T x H x D
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_row H x R x D x Npad
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_col H x R x D x Npad
                                  .Arg<ffi::Buffer<ffi::F32>>()  // core_sum H x R x R (sum over the cores)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u H x R
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t H x R
                                  .Attr<int64_t>("num_keys")  // N <= Npad
                                  .Attr<int64_t>("preselect")
                                  .Attr<int64_t>("topk")
                                  .Attr<bool>("additive")
                                  .Ret<ffi::Buffer<ffi::S32>>());  // slots T x H x M
