// PEP threshold + bag pooling, fused CPU kernels (forward and backward).
//
// Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width (the row stride of
// `rows` may be larger: the sharded lookup passes a column slice of the TBE output without a copy).
// The spec is the pure-PyTorch reference `pep_torchrec.ops.threshold_pool.threshold_pool_reference`.
//
// Deliberately free of torch headers: this file compiles in ~1 s with `g++ -O3 -fopenmp` (a
// torch.utils.cpp_extension build of the same code took 35-90 s on the 2-core CI machine, because
// <torch/library.h> alone is ~10^5 lines), and is called through ctypes from `threshold_pool_cpu.py`
// with raw pointers. Threads: OpenMP over bags; every output element (pooled row, gradient row) is
// written by exactly one thread, so no atomics; the [D] coarse-threshold gradient is reduced from
// per-thread partial sums.
//
// Modes (ThresholdMode): 0 ROW_DIM (s = rows[n, D + d]), 1 ROW (s = rows[n, D]), 2 COARSE
// (s = coarse_s[d]), 3 MASK (v̂ = v · 1[rows[n, D + d] > 0.5]), 4 NONE (v̂ = v).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

namespace {

constexpr int ROW_DIM = 0, ROW = 1, COARSE = 2, MASK = 3, NONE = 4;

// exp for float32 without libm calls, so that GCC vectorises the per-row loops over d (scalar
// std::exp cost ~18 ns/element, 10x the rest of the op). Cephes' expf: x = n·ln2 + r with
// |r| ≤ ln2/2, a degree-6 polynomial for e^r (≤ 1 ulp), 2^n built in the exponent bits. The clamp
// keeps 2^n a normal float; sigmoid(s) for s < −88 then comes out ~1e-38 instead of 0 (a
// threshold below any representable |v| difference).
inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // not fmin/fmax: those block vectorisation
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split hi + lo: exact n·ln2_hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
}
inline double exp_(double x) { return std::exp(x); }

// sigmoid in the accumulation dtype, as torch.sigmoid: 1 / (1 + exp(-s)).
template <typename T>
inline T sigmoid_(T s) { return T(1) / (T(1) + exp_(-s)); }

// Dynamic scheduling in chunks of bags: bag sizes vary (Zipf pooling factors, empty bags), so a
// static split can leave one thread with all the long bags.
inline int64_t chunk_of(int64_t num_bags, int num_threads) {
  int64_t c = num_bags / (int64_t(num_threads) * 8);
  return c < 1 ? 1 : c;
}

// Columns are processed in blocks of K = 64 bytes (16 floats, 8 doubles: two AVX2 registers). A
// block's accumulators and gradients live in registers for the whole bag: with a compile-time width
// the d loops unroll completely, with no per-bag loop set-up, heap accumulator or aliasing check.
// The D % K tail columns take the same code with a run-time width.
template <typename T>
constexpr int64_t kBlock = 64 / sizeof(T);

// The thresholded element v̂ (MODE is compile-time: the branches vanish, the d loops vectorise).
// `s` is the row's s/m value for this column (ROW_DIM, MASK), `t` the precomputed threshold gk·σ(s)
// (ROW, COARSE).
template <typename T, int mode>
inline T threshold_(T v, T s, T t, T gk) {
  if constexpr (mode == NONE) {
    return v;
  } else if constexpr (mode == MASK) {
    return s > T(0.5) ? v : T(0);
  } else {
    if constexpr (mode == ROW_DIM) t = gk * sigmoid_(s);
    // sign(v)·relu(|v| − t) without branches on the sign: copysign keeps v's sign and gives +0 / −0
    // for pruned elements (both add as 0).
    const T mag = std::fabs(v) - t;
    return mag > T(0) ? std::copysign(mag, v) : T(0);
  }
}

// Feature f's bag b, columns [d0, d0 + len): pooled into o[d0 ..]. LEN > 0: len == LEN at compile time.
template <typename T, int mode, int64_t LEN>
inline void forward_block(const T* rows, int64_t ld, int64_t col0, int64_t start, int64_t end,
                          int64_t D, int64_t d0, int64_t len, T gk, const T* coarse_t, const T* psw,
                          T denom, T* o) {
  if constexpr (LEN > 0) len = LEN;
  T acc[LEN > 0 ? LEN : kBlock<T>] = {};
  for (int64_t n = start; n < end; ++n) {
    const T* v = rows + n * ld + col0 + d0;
    const T* s = v + D;  // the s (or m) columns follow v in the stored row
    const T w = psw ? psw[n] : T(1);
    // Row-level threshold (ROW): one sigmoid per row, not per element.
    const T row_t = mode == ROW ? gk * sigmoid_(s[-d0]) : T(0);
#pragma omp simd
    for (int64_t d = 0; d < len; ++d) {
      const T t = mode == COARSE ? coarse_t[d0 + d] : row_t;
      acc[d] += threshold_<T, mode>(v[d], mode == ROW_DIM || mode == MASK ? s[d] : T(0), t, gk) * w;
    }
  }
  // Mean divides the (weighted) sum by the row count; an empty bag stays 0.
  if (denom != T(1)) {
    for (int64_t d = 0; d < len; ++d) o[d0 + d] = acc[d] / denom;
  } else {
    for (int64_t d = 0; d < len; ++d) o[d0 + d] = acc[d];
  }
}

// MODE is a template parameter: the per-element mode branches vanish at compile time, which is
// what lets GCC vectorise the loops over d.
// F features (F = 1 for one table; a whole sharded TBE group otherwise): feature f's bag b is
// rows offsets[f·B + b] .. offsets[f·B + b + 1] (a KJT's offsets), and row n of feature f lives at
// rows + (n − offsets[f·B])·ld + f·W; psw is indexed by n itself (a KJT's weights); pooled bag
// (f, b) goes to out + b·ldo + f·D. The parallel loop is over b with the features inside, so with
// one id per bag the F features of a TBE output row [n, F·W] are read together (streaming the
// buffer once, not F strided passes).
template <typename T, int mode>
void forward(const T* rows, int64_t ld, int64_t F, int64_t W, const int64_t* offsets, int64_t B,
             int64_t D, T gk, const T* coarse_s, const T* psw, int mean, T* out, int64_t ldo,
             int num_threads) {
  // COARSE: the thresholds are shared by all rows: compute gk·σ(s) once per call.
  std::vector<T> coarse_t(mode == COARSE ? D : 0);
  for (int64_t d = 0; d < (int64_t)coarse_t.size(); ++d) coarse_t[d] = gk * sigmoid_(coarse_s[d]);
  constexpr int64_t K = kBlock<T>;
  const int64_t full = D - D % K;
  const T* ct = coarse_t.data();
  const int64_t chunk = chunk_of(B, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t row0 = offsets[f * B];
        const int64_t start = offsets[f * B + b] - row0, end = offsets[f * B + b + 1] - row0;
        const T denom = (mean && end > start) ? T(end - start) : T(1);
        const T* psw_f = psw ? psw + row0 : nullptr;
        T* o = out + b * ldo + f * D;
        for (int64_t d0 = 0; d0 < full; d0 += K)
          forward_block<T, mode, K>(rows, ld, f * W, start, end, D, d0, K, gk, ct, psw_f, denom, o);
        if (full < D)
          forward_block<T, mode, 0>(rows, ld, f * W, start, end, D, full, D - full, gk, ct, psw_f,
                                    denom, o);
      }
    }
}

// Feature f's bag b, columns [d0, d0 + len): the gradients of its rows' v (and s / m) columns
// there; adds Σ_d g_d·v̂_d of the block to gw_rows[n] and the COARSE s-gradient to partial[d0 ..].
// ROW: the row's s-gradient is a sum over all D columns: the block adds its part to row_gs[n − start] and
// the last block (d0 + len = D) writes it, with the pressure, to column D (and zeros the pads).
// MASK: the m columns get zero gradient, written in the same loop. Every store in the d loop is
// unconditional (`scratch`, a row of W, takes the row gradients when nobody wants them): a store
// under a condition becomes a masked store (vmaskmovps), which is microcoded on AMD Zen and made
// this loop ~5x slower.
template <typename T, int mode, int64_t LEN>
inline void backward_block(const T* g, const T* rows, int64_t ld, int64_t col0, int64_t start,
                           int64_t end, int64_t D, int64_t d0, int64_t len, T gk,
                           int64_t W, const T* coarse_sig, const T* psw, T denom, T s_decay,
                           T s_push, T* grad_rows, int64_t ldg, T* scratch, T* gw_rows, T* row_gs,
                           T* partial) {
  if constexpr (LEN > 0) len = LEN;
  T gd[LEN > 0 ? LEN : kBlock<T>];  // the gradient reaching w·v̂ (mean: divided by the count)
  for (int64_t d = 0; d < len; ++d) gd[d] = denom != T(1) ? g[d0 + d] / denom : g[d0 + d];
  for (int64_t n = start; n < end; ++n) {
    const T* v = rows + n * ld + col0 + d0;
    const T* s = v + D;
    const T w = psw ? psw[n] : T(1);
    T* gr = (grad_rows ? grad_rows + n * ldg + col0 : scratch) + d0;
    // ROW: σ(s) once per row; its s-gradient is the sum over d (s is broadcast over D).
    const T row_sig = mode == ROW ? sigmoid_(s[-d0]) : T(0);
    T gw = T(0), gs_sum = T(0);
#pragma omp simd reduction(+ : gw, gs_sum)
    for (int64_t d = 0; d < len; ++d) {
      const T ge = gd[d] * w;  // ... and reaching v̂
      const T x = v[d];  // loaded unconditionally: a load under a condition is a masked load
      T gv, vhat;
      if constexpr (mode == NONE) {
        gv = ge;
        vhat = x;
      } else if constexpr (mode == MASK) {
        const bool keep = s[d] > T(0.5);
        gv = keep ? ge : T(0);  // masked elements: zero gradient (retrain)
        vhat = keep ? x : T(0);
        gr[D + d] = T(0);  // m never gets gradient
      } else {
        T sig;
        if constexpr (mode == ROW_DIM) sig = sigmoid_(s[d]);
        else if constexpr (mode == ROW) sig = row_sig;
        else sig = coarse_sig[d0 + d];
        const T mag = std::fabs(x) - gk * sig;
        const bool kept = mag > T(0);  // relu'(0) = 0: an element at its threshold is pruned
        vhat = kept ? std::copysign(mag, x) : T(0);
        gv = kept ? ge : T(0);
        // ∂v̂/∂s = −sign(v)·1[kept]·gk·σ(1 − σ); kept implies v ≠ 0, so sign(v) = ±1.
        const T gs = kept ? (x < T(0) ? ge : -ge) * gk * sig * (T(1) - sig) : T(0);
        if constexpr (mode == ROW_DIM) {
          gr[D + d] = gs + s_decay * s[d] - s_push;  // + sparsity pressure, per row
        } else if constexpr (mode == ROW) {
          gs_sum += gs;
        } else {
          partial[d0 + d] += gs;
        }
      }
      gr[d] = gv;
      gw += gd[d] * vhat;
    }
    if (gw_rows) gw_rows[n] += gw;
    if constexpr (mode == ROW) {
      const T row_total = (row_gs ? row_gs[n - start] : T(0)) + gs_sum;
      if (d0 + len < D) {
        row_gs[n - start] = row_total;
      } else {
        gr[D - d0] = row_total + s_decay * s[-d0] - s_push;  // + sparsity pressure, per row
        for (int64_t c = D + 1; c < W; ++c) gr[c - d0] = T(0);  // pad columns
      }
    }
  }
}

// Layout as in `forward`; the gradient of pooled bag (f, b) is at grad_out + b·ldgo + f·D, the
// gradient of row n of feature f goes to grad_rows + (n − offsets[f·B])·ldg + f·W (all W columns
// written), grad_psw[n].
template <typename T, int mode>
void backward(const T* grad_out, int64_t ldgo, const T* rows, int64_t ld, int64_t F,
              const int64_t* offsets, int64_t B, int64_t D, int64_t W, T gk, const T* coarse_s,
              const T* psw, int mean, T s_decay, T s_push, T* grad_rows, int64_t ldg, T* grad_coarse,
              T* grad_psw, int num_threads) {
  std::vector<T> coarse_sig(mode == COARSE ? D : 0);
  for (int64_t d = 0; d < (int64_t)coarse_sig.size(); ++d) coarse_sig[d] = sigmoid_(coarse_s[d]);
  // Per-thread partial sums of the coarse gradient, reduced after the parallel loop (if wanted).
  const bool want_coarse = mode == COARSE && grad_coarse != nullptr;
  std::vector<T> partial(mode == COARSE ? int64_t(num_threads) * D : 0, T(0));
  constexpr int64_t K = kBlock<T>;
  const int64_t full = D - D % K;
  const T* cs = coarse_sig.data();
  const int64_t chunk = chunk_of(B, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    T* my_partial = mode == COARSE ? partial.data() + int64_t(omp_get_thread_num()) * D : nullptr;
    std::vector<T> scratch(grad_rows ? 0 : W);
    std::vector<T> row_gs;  // ROW with D > K: each row's s-gradient, summed over the blocks
#pragma omp for schedule(dynamic, chunk)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t row0 = offsets[f * B];
        const int64_t start = offsets[f * B + b] - row0, end = offsets[f * B + b + 1] - row0;
        if (end == start) continue;
        const T denom = mean ? T(end - start) : T(1);
        const T* g = grad_out + b * ldgo + f * D;
        const T* psw_f = psw ? psw + row0 : nullptr;
        T* gw_rows = grad_psw ? grad_psw + row0 : nullptr;
        if (gw_rows) std::fill(gw_rows + start, gw_rows + end, T(0));
        T* gs_rows = nullptr;
        if (mode == ROW && D > K) {
          if ((int64_t)row_gs.size() < end - start) row_gs.resize(end - start);
          std::fill(row_gs.begin(), row_gs.begin() + (end - start), T(0));
          gs_rows = row_gs.data();
        }
        for (int64_t d0 = 0; d0 < full; d0 += K)
          backward_block<T, mode, K>(g, rows, ld, f * W, start, end, D, d0, K, gk, W, cs, psw_f,
                                     denom, s_decay, s_push, grad_rows, ldg, scratch.data(), gw_rows,
                                     gs_rows, my_partial);
        if (full < D)
          backward_block<T, mode, 0>(g, rows, ld, f * W, start, end, D, full, D - full, gk, W, cs,
                                     psw_f, denom, s_decay, s_push, grad_rows, ldg, scratch.data(),
                                     gw_rows, gs_rows, my_partial);
      }
    }
  }
  if (want_coarse) {
    for (int64_t d = 0; d < D; ++d) {
      T sum = T(0);
      for (int t = 0; t < num_threads; ++t) sum += partial[int64_t(t) * D + d];
      grad_coarse[d] = sum;
    }
  }
}

}  // namespace

extern "C" {

int pep_abi_version() { return 5; }

// Instantiate the kernel for the runtime `mode` (M is the compile-time copy).
#define DISPATCH_MODE(...)                   \
  switch (mode) {                            \
    case ROW_DIM: { constexpr int M = ROW_DIM; __VA_ARGS__; break; } \
    case ROW: { constexpr int M = ROW; __VA_ARGS__; break; }         \
    case COARSE: { constexpr int M = COARSE; __VA_ARGS__; break; }   \
    case MASK: { constexpr int M = MASK; __VA_ARGS__; break; }       \
    default: { constexpr int M = NONE; __VA_ARGS__; break; }         \
  }

#define PEP_DEFINE(SUFFIX, T)                                                                       \
  void pep_threshold_pool_fwd_##SUFFIX(const T* rows, int64_t ld, const int64_t* offsets, int64_t B, \
                                      int64_t D, int mode, double gk, const T* coarse_s,              \
                                      const T* psw, int mean, T* out, int num_threads) {              \
    DISPATCH_MODE(forward<T, M>(rows, ld, 1, 0, offsets, B, D, T(gk), coarse_s, psw, mean, out, D,  \
                                num_threads));                                                      \
  }                                                                                                 \
  void pep_threshold_pool_bwd_##SUFFIX(const T* grad_out, const T* rows, int64_t ld,                  \
                                      const int64_t* offsets, int64_t B, int64_t D, int64_t W,        \
                                      int mode, double gk, const T* coarse_s, const T* psw, int mean, \
                                      double s_decay, double s_push, T* grad_rows, T* grad_coarse,    \
                                      T* grad_psw, int num_threads) {                                 \
    DISPATCH_MODE(backward<T, M>(grad_out, D, rows, ld, 1, offsets, B, D, W, T(gk), coarse_s, psw,  \
                                 mean, T(s_decay), T(s_push), grad_rows, W, grad_coarse, grad_psw,  \
                                 num_threads));                                                     \
  }                                                                                                 \
  /* Grouped: F features of one TBE output rows [N_max, F·W] (feature f's ids in rows 0..N_f, its  \
     columns [f·W, (f+1)·W)), KJT offsets [F·B + 1] (global: feature f's ids start at             \
     offsets[f·B]), psw indexed like the KJT values; out [B, F·D]; grad_rows [N_max, F·W] fully     \
     written (rows past N_f: zero). One call per TBE group instead of one per feature. */          \
  void pep_threshold_pool_group_fwd_##SUFFIX(const T* rows, int64_t ld, int64_t F, int64_t W,       \
                                            const int64_t* offsets, int64_t B, int64_t D, int mode,  \
                                            double gk, const T* psw, int mean, T* out, int num_threads) { \
    DISPATCH_MODE(forward<T, M>(rows, ld, F, W, offsets, B, D, T(gk), nullptr, psw, mean, out, F * D, \
                                num_threads));                                                      \
  }                                                                                                 \
  void pep_threshold_pool_group_bwd_##SUFFIX(const T* grad_out, const T* rows, int64_t ld,          \
                                            int64_t num_rows, int64_t F, int64_t W,                 \
                                            const int64_t* offsets, int64_t B, int64_t D, int mode,  \
                                            double gk, const T* psw, int mean, double s_decay,      \
                                            double s_push, T* grad_rows, int64_t ldg, int num_threads) { \
    DISPATCH_MODE(backward<T, M>(grad_out, F * D, rows, ld, F, offsets, B, D, W, T(gk), nullptr, psw, \
                                 mean, T(s_decay), T(s_push), grad_rows, ldg, nullptr, nullptr,     \
                                 num_threads));                                                     \
    /* The TBE's padding bags (rows N_f .. N_max of feature f) get no gradient. */                  \
    for (int64_t n = 0; n < num_rows; ++n)                                                          \
      for (int64_t f = 0; f < F; ++f)                                                               \
        if (n >= offsets[(f + 1) * B] - offsets[f * B])                                             \
          std::memset(grad_rows + n * ldg + f * W, 0, sizeof(T) * W);                               \
  }

PEP_DEFINE(f32, float)
PEP_DEFINE(f64, double)

// The own s optimizer's row map (`s_optimizer.plan_step`): the batch's looked-up storage rows,
// occurrence k's row = values[j] + feature_base[f], where occurrence order and j are
//   lengths == null (every feature has n_max ids, values feature-major): k = n·F + f, j = f·n_max + n
//   lengths != null: k runs over (f, n < lengths[f]), j = k.
// Outputs what torch.unique(rows, sorted=True, return_inverse=True) and a bucketize of the unique
// rows into the tables' storage bases give - ids [U] ascending, inverse [n] (occurrence → u),
// table_of_id [U] (the table whose base is the last one ≤ the row) - and, for the gather, the
// occurrences grouped by row: slots [n] (n·F + f of each occurrence, by row, occurrence order within
// a row) with row u's occurrences at slots[seg[u] .. seg[u + 1]). Returns U.
// How: a stable LSD radix sort of the words row << bits(n) | k on 11-bit digits of the row (ceil(log2(num_rows) / 11) passes over
// the ids, none over the table), then one scan. Stable, so each row's occurrences stay in
// occurrence order: the gather sums them in the order index_add_ does. A row outside
// [0, num_rows) returns -1, rows and ids too many to pack in 63 bits (2^63 row·id pairs) -2.
int64_t pep_unique_rows(const int64_t* values, int64_t n, int64_t F, int64_t n_max,
                        const int64_t* lengths, const int64_t* feature_base, int64_t num_rows,
                        const int64_t* base_sorted, const int64_t* base_table, int64_t num_tables,
                        int64_t* ids, int64_t* inverse, int64_t* table_of_id, int64_t* slots,
                        int64_t* seg) {
  // Each occurrence is one 64-bit word, row << occ_bits | k, sorted on the row bits only.
  int row_bits = 0, occ_bits = 0;
  while (row_bits < 63 && (int64_t(1) << row_bits) < num_rows) ++row_bits;
  while (occ_bits < 63 && (int64_t(1) << occ_bits) < n) ++occ_bits;
  if (row_bits + occ_bits > 63) return -2;
  const uint64_t occ_mask = (uint64_t(1) << occ_bits) - 1;
  // Scratch kept across calls (grow-only, per thread): fresh multi-MB buffers every step cost more
  // in page faults than the sort.
  thread_local std::vector<uint64_t> word, word2;
  for (auto* v : {&word, &word2})
    if ((int64_t)v->size() < n) v->resize(n);
  bool in_range = true;
  if (lengths == nullptr) {  // occurrence k = i·F + f reads values[f·n_max + i]
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < n_max; ++i) {
        const int64_t row = values[f * n_max + i] + feature_base[f], k = i * F + f;
        in_range &= row >= 0 && row < num_rows;
        word[k] = uint64_t(row) << occ_bits | uint64_t(k);
      }
  } else {
    for (int64_t f = 0, k = 0; f < F; ++f)
      for (int64_t i = 0; i < lengths[f]; ++i, ++k) {
        const int64_t row = values[k] + feature_base[f];
        in_range &= row >= 0 && row < num_rows;
        word[k] = uint64_t(row) << occ_bits | uint64_t(k);
      }
  }
  if (!in_range) return -1;
  // LSD radix sort on the row bits; one pass counts every digit.
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  const int passes = (row_bits + kBits - 1) / kBits;
  thread_local std::vector<int64_t> count;
  count.assign(int64_t(passes) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int p = 0; p < passes; ++p) ++count[p * kBuckets + ((word[i] >> (occ_bits + p * kBits)) & (kBuckets - 1))];
  for (int p = 0; p < passes; ++p) {
    int64_t* c = count.data() + p * kBuckets;
    int64_t sum = 0;
    for (int64_t b = 0; b < kBuckets; ++b) { const int64_t c0 = c[b]; c[b] = sum; sum += c0; }
    const int shift = occ_bits + p * kBits;
    for (int64_t i = 0; i < n; ++i) word2[c[(word[i] >> shift) & (kBuckets - 1)]++] = word[i];
    word.swap(word2);
  }
  // The slot (n·F + f) of occurrence k: k itself without lengths, else from f's id range.
  thread_local std::vector<int64_t> slot_of;
  if (lengths) {
    if ((int64_t)slot_of.size() < n) slot_of.resize(n);
    int64_t k = 0;
    for (int64_t f = 0; f < F; ++f)
      for (int64_t i = 0; i < lengths[f]; ++i) slot_of[k++] = i * F + f;
  }
  int64_t U = 0, t = 0, prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = int64_t(word[i] >> occ_bits), k = int64_t(word[i] & occ_mask);
    if (row != prev) {
      while (t + 1 < num_tables && base_sorted[t + 1] <= row) ++t;
      ids[U] = prev = row;
      table_of_id[U] = base_table[t];
      seg[U++] = i;
    }
    inverse[k] = U - 1;
    slots[i] = lengths ? slot_of[k] : k;
  }
  seg[U] = n;
  return U;
}

// The own s optimizer's gradient (`s_optimizer.OwnSStep.backward`): the s columns [s_off, s_off + S)
// of the group's row gradient grad [n_max, F·W] (row stride ld; feature f's row n in columns
// [f·W, (f+1)·W)) summed per unique looked-up row u into g [U, S] over its occurrences
// slots[seg[u] .. seg[u + 1]) (`pep_unique_rows`) in that order - the order index_add_ sums them in -
// then zeroed so the TBE's optimizer never sees them; so are the s columns of the padding rows
// n ≥ lengths[f]. Threads split the unique rows: the result is the same for any thread count.
#define PEP_DEFINE_S_GATHER(SUFFIX, T)                                                              \
  void pep_s_gather_##SUFFIX(T* grad, int64_t ld, int64_t n_max, int64_t F, int64_t W, int64_t s_off, \
                             int64_t S, const int64_t* slots, const int64_t* seg, const int64_t* lengths, \
                             T* g, int64_t U, int num_threads) {                                     \
    const int nt = U * S >= (int64_t(1) << 16) ? std::max(num_threads, 1) : 1;                      \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                    \
    for (int64_t u = 0; u < U; ++u) {                                                               \
      T* dst = g + u * S;                                                                           \
      std::memset(dst, 0, sizeof(T) * S);                                                           \
      for (int64_t i = seg[u]; i < seg[u + 1]; ++i) {                                               \
        if (i + 16 < seg[U]) {  /* the reads are random: keep ~16 of them in flight */              \
          const int64_t ahead = slots[i + 16];                                                      \
          __builtin_prefetch(grad + (ahead / F) * ld + (ahead % F) * W + s_off, 1);                 \
        }                                                                                           \
        const int64_t slot = slots[i];                                                              \
        T* src = grad + (slot / F) * ld + (slot % F) * W + s_off;                                   \
        for (int64_t c = 0; c < S; ++c) dst[c] += src[c];                                           \
        std::memset(src, 0, sizeof(T) * S);                                                         \
      }                                                                                             \
    }                                                                                               \
    if (lengths)                                                                                    \
      for (int64_t f = 0; f < F; ++f)                                                               \
        for (int64_t n = lengths[f]; n < n_max; ++n)                                                \
          std::memset(grad + n * ld + f * W + s_off, 0, sizeof(T) * S);                             \
  }

PEP_DEFINE_S_GATHER(f32, float)
PEP_DEFINE_S_GATHER(f64, double)

// The own s optimizer's step (pep_torchrec/distributed/s_optimizer.py, `SOptimizerState.update`,
// which keeps the statistics): for each unique looked-up row u (storage row ids[u], local table
// t = table_of_id[u]) with summed s-gradient grad[u, 0..S): storage[ids[u], s_off + c] -=
// (grad[u, c] / gk) · scale[t], in T, rounded like the PyTorch path (no fused multiply-add: the
// function is compiled with fp-contract off). Rows are unique, so threads never write the same
// storage row; bound by the random row reads (~1 ms at 10^5 rows, one thread).
#define PEP_DEFINE_S_UPDATE(SUFFIX, T)                                                              \
  __attribute__((optimize("fp-contract=off")))                                                     \
  void pep_s_update_##SUFFIX(T* storage, int64_t ld, const int64_t* ids, const int64_t* table_of_id, \
                             int64_t U, const T* grad, int64_t S, int64_t s_off, const double* scale, \
                             double gk, int num_threads) {                                           \
    const T gk_ = T(gk);                                                                            \
    const int nt = U * S >= (int64_t(1) << 16) ? std::max(num_threads, 1) : 1;                      \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                    \
    for (int64_t u = 0; u < U; ++u) {                                                               \
      if (u + 16 < U) __builtin_prefetch(storage + ids[u + 16] * ld + s_off, 1);                   \
      const T step = T(scale[table_of_id[u]]);                                                      \
      T* s = storage + ids[u] * ld + s_off;                                                         \
      const T* g = grad + u * S;                                                                    \
      for (int64_t c = 0; c < S; ++c) s[c] -= (g[c] / gk_) * step;                                  \
    }                                                                                               \
  }

PEP_DEFINE_S_UPDATE(f32, float)
PEP_DEFINE_S_UPDATE(f64, double)

}  // extern "C"
