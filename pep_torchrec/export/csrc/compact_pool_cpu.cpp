// Fused pooled lookup over a compact (CSR) table: the CPU kernel of `CompactEmbeddingBag`.
//
// Legend: R = table rows, D = embedding dim, N = looked-up ids, B = bags.
// The spec is the pure-PyTorch path `CompactEmbeddingBag.forward_reference` (export/compact.py); in
// fp32 the result is bit-identical to it: every output element receives its contributions in id
// order, each contribution computed as there (value widened to fp32, · 2^exponent for int8,
// · per-sample weight), and mean pooling divides by max(bag length, 1) at the end.
//
// A record = one kept row's [length values (fp32 / fp16 / int8) | their length columns (uint8, or
// int64 when D > 256)], unaligned. Two layouts (see compact.py):
//  * slots (`pep_compact_pool_slots`): a fixed-width slot per original id at data + id · S:
//    [n | exponent + 128 | n uint8 columns | n values at value_offset]; n = 255: the row's record is
//    elsewhere in `data` and slot bytes [8, 16) hold its packed int64 (below). One random read of
//    one aligned slot per id.
//  * records (`pep_compact_pool`): packed_R[id] = start << 24 | (exponent + 128) << 16 | length,
//    length = 0 for a pruned row, and the record at byte `start` of `data`: two dependent random reads.
//
// Threads: OpenMP over bags; every pooled row is written by exactly one thread. Software prefetch
// runs ahead over the id range: slots P ids ahead; or packed_R of id n + 2P, then the record of id
// n + P. (Tried and slower on the 2-core EPYC dev machine: a column-bitmask record expanded with
// AVX2 permutes (more instructions per id than a dense row's adds); a branch-free first 4 elements
// per row; a separate gather pass of packed_R per group of bags.) Torch-header free so that it
// builds in ~1 s (see compact.py).
#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define PEP_MASKS_AVX512 1
#endif



namespace {

constexpr int kLengthBits = 16;
constexpr int64_t kLengthMask = (int64_t(1) << kLengthBits) - 1;
constexpr int kStartShift = 24;
constexpr int kExponentBias = 128;
constexpr int64_t kPrefetch = 8;
constexpr int kOverflow = 0xFF;

struct Half {
  uint16_t bits;
};

// Unaligned loads (records are packed back to back); memcpy compiles to a plain mov on x86 / arm64.
template <typename T>
inline T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return float(v); }
// IEEE binary16 → binary32, exact (normals, subnormals, inf / nan).
inline float widen(Half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: mantissa · 2^-24, exact in fp32
      float f = float(mantissa) * 5.9604644775390625e-8f;
      std::memcpy(&bits, &f, sizeof(bits));
      bits |= sign;
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// 2^e as a float (e in [-149, 127]; int8 row scales are far inside), exact.
inline float pow2(int e) {
  if (e < -126) {
    float f = pow2(e + 24);
    return f * 5.9604644775390625e-8f;  // · 2^-24
  }
  const uint32_t bits = uint32_t(e + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Validate first (vectorised, ~0.2 ns per id), so that the pooling loops have no range checks.
// Returns -1 (valid), -2 (offsets not [0, ..., N] non-decreasing) or the first id outside [0, R).
int64_t check_inputs(int64_t num_rows, const int64_t* ids, int64_t num_ids, const int64_t* offsets,
                     int64_t num_bags) {
  if (offsets[0] != 0 || offsets[num_bags] != num_ids) return -2;
  for (int64_t b = 0; b < num_bags; ++b)
    if (offsets[b + 1] < offsets[b]) return -2;
  uint64_t worst = 0;
  for (int64_t n = 0; n < num_ids; ++n) worst = uint64_t(ids[n]) > worst ? uint64_t(ids[n]) : worst;
  if (worst >= uint64_t(num_rows)) {
    for (int64_t n = 0; n < num_ids; ++n)
      if (uint64_t(ids[n]) >= uint64_t(num_rows)) return n;
  }
  return -1;
}

template <typename V, typename C>
inline void add_row(const unsigned char* blob, int64_t p, float w, int quantized, const float* psw, float* o) {
  const int64_t length = p & kLengthMask;
  const unsigned char* v = blob + (p >> kStartShift);
  const unsigned char* c = v + length * int64_t(sizeof(V));
  const float scale = quantized ? pow2(int((p >> kLengthBits) & 0xff) - kExponentBias) : 1.0f;
  for (int64_t k = 0; k < length; ++k) {
    float x = widen(load<V>(v + k * sizeof(V)));
    if (quantized) x = x * scale;
    if (psw != nullptr) x = x * w;
    o[load<C>(c + k * sizeof(C))] += x;
  }
}

// Every bag b of `offsets` pooled into out[b, 0:dim]: zeroed, add_id(n, o) for each of its id
// positions n, divided by its count for mean (an empty bag stays 0). Threads split the bags.
template <typename AddId>
inline void for_each_bag(const int64_t* offsets, int64_t num_bags, int64_t dim, int mean, float* out, int threads,
                         const AddId& add_id) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && num_bags >= 64)
  for (int64_t b = 0; b < num_bags; ++b) {
    float* o = out + b * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = 0.0f;
    const int64_t lo = offsets[b], hi = offsets[b + 1];
    for (int64_t n = lo; n < hi; ++n) add_id(n, o);
    if (mean) {
      const float count = float(hi - lo > 1 ? hi - lo : 1);
      for (int64_t d = 0; d < dim; ++d) o[d] = o[d] / count;
    }
  }
}

template <typename V, typename C>
int64_t pool(const int64_t* packed, int64_t num_rows, const int64_t* ids, int64_t num_ids, const int64_t* offsets,
             int64_t num_bags, int64_t dim, const unsigned char* blob, int quantized, const float* psw,
             int mean, float* out, int threads) {
  const int64_t bad = check_inputs(num_rows, ids, num_ids, offsets, num_bags);
  if (bad != -1) return bad;
  const int64_t last = num_ids - 1;
  for_each_bag(offsets, num_bags, dim, mean, out, threads, [&](int64_t n, float* o) {
    // Two stages ahead: packed_R of id n + 2P, the record of id n + P (clamped at the last id).
    __builtin_prefetch(packed + ids[n + 2 * kPrefetch < last ? n + 2 * kPrefetch : last]);
    __builtin_prefetch(blob + (packed[ids[n + kPrefetch < last ? n + kPrefetch : last]] >> kStartShift));
    add_row<V, C>(blob, packed[ids[n]], psw != nullptr ? psw[n] : 1.0f, quantized, psw, o);
  });
  return -1;
}

template <typename V>
int64_t pool_slots(const unsigned char* data, int64_t slot_bytes, int64_t value_offset, int64_t num_rows,
                   const int64_t* ids, int64_t num_ids, const int64_t* offsets, int64_t num_bags, int64_t dim,
                   int quantized, const float* psw, int mean, float* out, int threads) {
  const int64_t bad = check_inputs(num_rows, ids, num_ids, offsets, num_bags);
  if (bad != -1) return bad;
  const int64_t last = num_ids - 1;
  for_each_bag(offsets, num_bags, dim, mean, out, threads, [&](int64_t n, float* o) {
    __builtin_prefetch(data + ids[n + 2 * kPrefetch < last ? n + 2 * kPrefetch : last] * slot_bytes);
    const unsigned char* slot = data + ids[n] * slot_bytes;
    const int count = slot[0];
    const float w = psw != nullptr ? psw[n] : 1.0f;
    if (count == kOverflow) {
      add_row<V, uint8_t>(data, load<int64_t>(slot + 8), w, quantized, psw, o);
      return;
    }
    const float scale = quantized ? pow2(int(slot[1]) - kExponentBias) : 1.0f;
    const unsigned char* v = slot + value_offset;
    for (int k = 0; k < count; ++k) {
      float x = widen(load<V>(v + k * sizeof(V)));
      if (quantized) x = x * scale;
      if (psw != nullptr) x = x * w;
      o[slot[2 + k]] += x;
    }
  });
  return -1;
}

// The masks layout (`pep_compact_pool_masks`, D <= 64): a fixed-width slot per id at data + id · S:
// [exponent + 128 | overflow flag | column bitmask (2 / 4 / 8 bytes for D <= 16 / 32 / 64, at byte
// 2 / 4 / 8) | the kept values in column order, at value_offset]. Overflow flag 1: the values are at
// data + the int64 at slot byte pointer_offset instead (the mask stays in the slot). A pruned row:
// mask 0. Per id: one read of the slot, then per 16 columns one masked expand-load of the values
// into the lanes the mask names and one masked add (AVX-512; elsewhere a loop over the mask's bits).
//
// Features: the ids of bag b belong to feature f = b / stride (KJT order: F features × `stride` bags),
// must lie in [0, rows[f]) and read row base[f] + id; the pooled row goes to out[(b % stride) · F + f]
// (a [stride, F, D] result: the KeyedTensor's values as they are). One feature, base 0 = a plain bag.
template <typename O>
int64_t check_features(const int64_t* ids, int64_t num_ids, const O* offsets, int64_t num_bags, int64_t stride,
                       int64_t num_features, const int64_t* rows) {
  if (offsets[0] != 0 || int64_t(offsets[num_bags]) != num_ids) return -2;
  for (int64_t b = 0; b < num_bags; ++b)
    if (offsets[b + 1] < offsets[b]) return -2;
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t lo = offsets[f * stride], hi = offsets[(f + 1) * stride];
    const uint64_t limit = uint64_t(rows[f]);
    uint64_t worst = 0;
    for (int64_t n = lo; n < hi; ++n) worst = uint64_t(ids[n]) > worst ? uint64_t(ids[n]) : worst;
    if (worst >= limit) {
      for (int64_t n = lo; n < hi; ++n)
        if (uint64_t(ids[n]) >= limit) return n;
    }
  }
  return -1;
}

template <int CH>
inline uint64_t load_mask(const unsigned char* slot) {
  if constexpr (CH == 1) return load<uint16_t>(slot + 2);
  else if constexpr (CH == 2) return load<uint32_t>(slot + 4);
  else return load<uint64_t>(slot + 8);
}

#ifdef PEP_MASKS_AVX512
// The popcount(m) values at v spread into the lanes m names, as fp32 (0 elsewhere): a plain load of
// 16 values (the data buffer has 64 zero bytes after its last value: _MASKS_PADDING in compact.py), then an in-register
// expand (expand-loads from memory and a popcount-masked load were slower on Zen 4).
template <typename V>
inline __m512 expand16(__mmask16 m, const unsigned char* v) {
  if constexpr (sizeof(V) == 4) {
    return _mm512_maskz_expand_ps(m, _mm512_loadu_ps(v));
  } else if constexpr (sizeof(V) == 2) {  // fp16 → fp32 is exact (vcvtph2ps)
    return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))));
  } else {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_maskz_expand_epi8(m, _mm_loadu_si128(reinterpret_cast<const __m128i*>(v)))));
  }
}
#endif

// Bags [first, end) (arguments by value: kept in registers, which the variables an OpenMP region
// shares are not: ~2x slower when this loop was the region's body).
// Q: int8 row scales; W: per-sample weights (compile-time: ~15% faster than tests in the loop).
template <typename V, int CH, bool SIMD, typename O, bool Q, bool W>
void pool_masks_range(const unsigned char* data, int64_t slot_bytes, int64_t value_offset, int64_t pointer_offset,
                      const int64_t* base, int64_t num_features, const int64_t* ids, int64_t last,
                      const O* offsets, int64_t stride, int64_t dim, const float* psw, int mean, float* out,
                      int64_t first, int64_t end) {
  constexpr bool quantized = Q;
  // (feature, bag in feature) advanced as we go: no division per bag.
  int64_t f = first / stride, i = first - f * stride;
  const unsigned char* table = data + base[f < num_features ? f : 0] * slot_bytes;
  for (int64_t b = first; b < end; ++b, ++i) {
    if (i == stride) {
      i = 0;
      table = data + base[++f] * slot_bytes;
    }
    float* o = out + (i * num_features + f) * dim;
    const int64_t lo = offsets[b], hi = offsets[b + 1];
#ifdef PEP_MASKS_AVX512
    if constexpr (SIMD) {
      __m512 acc[CH];
      for (int c = 0; c < CH; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t n = lo; n < hi; ++n) {
        __builtin_prefetch(table + ids[n + kPrefetch < last ? n + kPrefetch : last] * slot_bytes);
        const unsigned char* slot = table + ids[n] * slot_bytes;
        const uint64_t mask = load_mask<CH>(slot);
        const int64_t record = load<int64_t>(slot + pointer_offset);  // read always: a select, no branch
        const unsigned char* v = slot[1] ? data + record : slot + value_offset;
        const __m512 scale = _mm512_set1_ps(Q ? pow2(int(slot[0]) - kExponentBias) : 1.0f);
        const __m512 w = _mm512_set1_ps(W ? psw[n] : 1.0f);
        for (int c = 0; c < CH; ++c) {
          const __mmask16 m = __mmask16(mask >> (16 * c));
          __m512 x = expand16<V>(m, v);
          if (Q) x = _mm512_mul_ps(x, scale);
          if (W) x = _mm512_mul_ps(x, w);
          acc[c] = _mm512_mask_add_ps(acc[c], m, acc[c], x);  // lanes outside the mask: untouched
          v += _mm_popcnt_u32(m) * sizeof(V);
        }
      }
      const __m512 count = _mm512_set1_ps(float(hi - lo > 1 ? hi - lo : 1));
      for (int c = 0; c < CH; ++c) {
        const int64_t lanes = dim - 16 * c < 16 ? dim - 16 * c : 16;
        if (lanes <= 0) break;
        const __mmask16 keep = __mmask16((uint32_t(1) << lanes) - 1);
        _mm512_mask_storeu_ps(o + 16 * c, keep, mean ? _mm512_div_ps(acc[c], count) : acc[c]);
      }
      continue;
    }
#endif
    for (int64_t d = 0; d < dim; ++d) o[d] = 0.0f;
    for (int64_t n = lo; n < hi; ++n) {
      __builtin_prefetch(table + ids[n + kPrefetch < last ? n + kPrefetch : last] * slot_bytes);
      const unsigned char* slot = table + ids[n] * slot_bytes;
      uint64_t mask = load_mask<CH>(slot);
      const unsigned char* v = slot[1] ? data + load<int64_t>(slot + pointer_offset) : slot + value_offset;
      const float scale = quantized ? pow2(int(slot[0]) - kExponentBias) : 1.0f;
      const float w = W ? psw[n] : 1.0f;
      for (; mask != 0; mask &= mask - 1, v += sizeof(V)) {
        float x = widen(load<V>(v));
        if (Q) x = x * scale;
        if (W) x = x * w;
        o[__builtin_ctzll(mask)] += x;
      }
    }
    if (mean) {
      const float count = float(hi - lo > 1 ? hi - lo : 1);
      for (int64_t d = 0; d < dim; ++d) o[d] = o[d] / count;
    }
  }
}

template <typename V, int CH, bool SIMD, typename O, bool Q, bool W>
void pool_masks_split(const unsigned char* data, int64_t slot_bytes, int64_t value_offset, int64_t pointer_offset,
                      const int64_t* base, int64_t num_features, const int64_t* ids, int64_t num_ids,
                      const O* offsets, int64_t num_bags, int64_t stride, int64_t dim, const float* psw, int mean,
                      float* out, int threads) {
  if (threads <= 1 || num_bags < 64) {
    pool_masks_range<V, CH, SIMD, O, Q, W>(data, slot_bytes, value_offset, pointer_offset, base, num_features, ids,
                                           num_ids - 1, offsets, stride, dim, psw, mean, out, 0, num_bags);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t parts = omp_get_num_threads(), part = omp_get_thread_num();
    pool_masks_range<V, CH, SIMD, O, Q, W>(data, slot_bytes, value_offset, pointer_offset, base, num_features, ids,
                                           num_ids - 1, offsets, stride, dim, psw, mean, out,
                                           num_bags * part / parts, num_bags * (part + 1) / parts);
  }
}

template <typename V, int CH, bool SIMD, typename O>
int64_t pool_masks(const unsigned char* data, int64_t slot_bytes, int64_t value_offset, int64_t pointer_offset,
                   const int64_t* base, const int64_t* rows, int64_t num_features, const int64_t* ids,
                   int64_t num_ids, const O* offsets, int64_t num_bags, int64_t stride, int64_t dim, int quantized,
                   const float* psw, int mean, float* out, int threads) {
  const int64_t bad = check_features(ids, num_ids, offsets, num_bags, stride, num_features, rows);
  if (bad != -1 || num_bags == 0) return bad;
#define PEP_SPLIT(Q, W)                                                                                        \
  pool_masks_split<V, CH, SIMD, O, Q, W>(data, slot_bytes, value_offset, pointer_offset, base, num_features, ids, \
                                         num_ids, offsets, num_bags, stride, dim, psw, mean, out, threads)
  if (quantized) {
    if (psw != nullptr) PEP_SPLIT(true, true);
    else PEP_SPLIT(true, false);
  } else {
    if (psw != nullptr) PEP_SPLIT(false, true);
    else PEP_SPLIT(false, false);
  }
#undef PEP_SPLIT
  return -1;
}

template <typename V, int CH, typename O>
int64_t pool_masks_any(int simd, const unsigned char* data, int64_t slot_bytes, int64_t value_offset,
                       int64_t pointer_offset, const int64_t* base, const int64_t* rows, int64_t num_features,
                       const int64_t* ids, int64_t num_ids, const O* offsets, int64_t num_bags, int64_t stride,
                       int64_t dim, int quantized, const float* psw, int mean, float* out, int threads) {
  if (simd)
    return pool_masks<V, CH, true>(data, slot_bytes, value_offset, pointer_offset, base, rows, num_features, ids,
                                   num_ids, offsets, num_bags, stride, dim, quantized, psw, mean, out, threads);
  return pool_masks<V, CH, false>(data, slot_bytes, value_offset, pointer_offset, base, rows, num_features, ids,
                                  num_ids, offsets, num_bags, stride, dim, quantized, psw, mean, out, threads);
}

template <typename V, typename O>
int64_t pool_masks_dim(int simd, const unsigned char* data, int64_t slot_bytes, int64_t value_offset,
                       int64_t pointer_offset, const int64_t* base, const int64_t* rows, int64_t num_features,
                       const int64_t* ids, int64_t num_ids, const O* offsets, int64_t num_bags, int64_t stride,
                       int64_t dim, int quantized, const float* psw, int mean, float* out, int threads) {
#define PEP_MASKS(CH)                                                                                          \
  return pool_masks_any<V, CH>(simd, data, slot_bytes, value_offset, pointer_offset, base, rows, num_features, \
                               ids, num_ids, offsets, num_bags, stride, dim, quantized, psw, mean, out, threads)
  if (dim <= 16) PEP_MASKS(1);
  if (dim <= 32) PEP_MASKS(2);
  if (dim <= 48) PEP_MASKS(3);
  PEP_MASKS(4);
#undef PEP_MASKS
}

}  // namespace

extern "C" {

int pep_compact_abi_version() { return 9; }

// Whether `pep_compact_pool_masks` has its AVX-512 path in this build (else simd = 1 runs the loop).
int pep_compact_masks_simd() {
#ifdef PEP_MASKS_AVX512
  return 1;
#else
  return 0;
#endif
}

// The masks layout (D <= 64), F = num_features features of `stride` bags each (see pool_masks).
// value_kind: 0 fp32, 1 fp16, 2 int8; offsets_kind: 0 int64, 1 int32; simd: 0 forces the scalar loop.
// Returns -1 (done), -2 (offsets not [0, ..., N] non-decreasing) or the position of the first id
// outside its feature's [0, rows[f]); nothing is written unless -1.
int64_t pep_compact_pool_masks(const void* data, int64_t slot_bytes, int64_t value_offset, int64_t pointer_offset,
                               const int64_t* base, const int64_t* rows, int64_t num_features, const int64_t* ids,
                               int64_t num_ids, const void* offsets, int offsets_kind, int64_t num_bags,
                               int64_t stride, int64_t dim, int value_kind, int quantized, const float* psw,
                               int mean, float* out, int threads, int simd) {
  const auto* d = static_cast<const unsigned char*>(data);
#define PEP_MASKS_V(V, O)                                                                                     \
  return pool_masks_dim<V, O>(simd, d, slot_bytes, value_offset, pointer_offset, base, rows, num_features, ids, \
                              num_ids, static_cast<const O*>(offsets), num_bags, stride, dim, quantized, psw,   \
                              mean, out, threads)
  if (offsets_kind == 0) {
    if (value_kind == 0) PEP_MASKS_V(float, int64_t);
    if (value_kind == 1) PEP_MASKS_V(Half, int64_t);
    PEP_MASKS_V(int8_t, int64_t);
  }
  if (value_kind == 0) PEP_MASKS_V(float, int32_t);
  if (value_kind == 1) PEP_MASKS_V(Half, int32_t);
  PEP_MASKS_V(int8_t, int32_t);
#undef PEP_MASKS_V
}

// The slots layout (uint8 columns only). value_kind: 0 fp32, 1 fp16, 2 int8. Returns as below.
int64_t pep_compact_pool_slots(const void* data, int64_t slot_bytes, int64_t value_offset, int64_t num_rows,
                               const int64_t* ids, int64_t num_ids, const int64_t* offsets, int64_t num_bags,
                               int64_t dim, int value_kind, int quantized, const float* psw, int mean, float* out,
                               int threads) {
  const auto* d = static_cast<const unsigned char*>(data);
  if (value_kind == 0)
    return pool_slots<float>(d, slot_bytes, value_offset, num_rows, ids, num_ids, offsets, num_bags, dim, quantized,
                             psw, mean, out, threads);
  if (value_kind == 1)
    return pool_slots<Half>(d, slot_bytes, value_offset, num_rows, ids, num_ids, offsets, num_bags, dim, quantized,
                            psw, mean, out, threads);
  return pool_slots<int8_t>(d, slot_bytes, value_offset, num_rows, ids, num_ids, offsets, num_bags, dim, quantized,
                            psw, mean, out, threads);
}

// value_kind: 0 fp32, 1 fp16, 2 int8; col_kind: 0 uint8, 1 int64. Returns -1 (done), -2 (offsets
// not [0, ..., N] non-decreasing) or the position of the first id outside [0, R); nothing is
// written unless -1.
int64_t pep_compact_pool(const int64_t* packed, int64_t num_rows, const int64_t* ids, int64_t num_ids,
                         const int64_t* offsets, int64_t num_bags, int64_t dim, const void* blob, int value_kind,
                         int col_kind, int quantized, const float* psw, int mean, float* out, int threads) {
  const auto* b = static_cast<const unsigned char*>(blob);
#define PEP_POOL(V, C) \
  return pool<V, C>(packed, num_rows, ids, num_ids, offsets, num_bags, dim, b, quantized, psw, mean, out, threads)
  if (col_kind == 0) {
    if (value_kind == 0) PEP_POOL(float, uint8_t);
    if (value_kind == 1) PEP_POOL(Half, uint8_t);
    PEP_POOL(int8_t, uint8_t);
  }
  if (value_kind == 0) PEP_POOL(float, int64_t);
  if (value_kind == 1) PEP_POOL(Half, int64_t);
  PEP_POOL(int8_t, int64_t);
#undef PEP_POOL
}
}
