// requires: avx2 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Linears on GGUF quantized weights as stored: the raw ggml blocks of each weight row are decoded in registers and
// meet fp32 activations in FMAs (no activation quantization), so the result is dequantize-then-matmul up to fp32
// rounding. Registered as torch.ops.frugallm.gguf_linear (few rows: decode) and gguf_dequantize (prefill's
// dequantize-then-GEMM, embedding rows).
//
//   gguf_linear(x [rows, K] float32|bfloat16 contiguous, w uint8 [N, K / block * bytes] contiguous, qtype, N,
//               bias float32 [N]?) -> [rows, N] in x's dtype (fp32 accumulation; bf16 output rounded once, RNE)
//   gguf_dequantize(w uint8 [N, bytes_per_row], qtype, K, dtype float32|bfloat16|float16) -> [N, K]
//
// Formats (ground truth: the `gguf` package's gguf/quants.py; qtype numbers are GGMLQuantizationType):
//   Q4_0 (2)  32 values in 18 bytes:  d f16, 16 bytes of nibbles (value j: low nibble of byte j, value 16+j: high)
//   Q4_1 (3)  32 in 20:  d, m f16, nibbles as Q4_0                              w = d * q + m
//   Q5_0 (6)  32 in 22:  d, qh u32 (bit j: 5th bit of value j), nibbles         w = d * (q - 16)
//   Q5_1 (7)  32 in 24:  d, m, qh, nibbles                                       w = d * q + m
//   Q8_0 (8)  32 in 34:  d, 32 int8                                              w = d * q
//   Q2_K (10) 256 in 84: 16 bytes (scale | min << 4) per 16 values, 64 bytes of 2-bit codes, d, dmin
//   Q3_K (11) 256 in 110: 32 bytes high-bit mask, 64 bytes 2-bit codes, 12 bytes of 6-bit scales, d
//   Q4_K (12) 256 in 144: d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32, 128 bytes of nibbles
//   Q5_K (13) 256 in 176: as Q4_K plus 32 bytes of 5th bits (bit s of byte i: value i of sub-block s)
//   Q6_K (14) 256 in 210: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales (per 16 values), d
//
// Every format is decoded in chunks of 32 consecutive values as 32 int8 codes q plus (scale, offset) for each
// 16-value half: w = scale * q - offset, the reference's arithmetic (for K-quants scale = d * sc and offset =
// dmin * min, each one fp32 product), so gguf_dequantize matches gguf.quants.dequantize bit for bit. The linear
// fuses that into one fmsub per 8 (AVX2) or 16 (AVX-512) values, then one FMA per input row.
//
// Code paths: AVX-512F (16-lane FMAs), AVX2 + FMA + F16C (8-lane; the baseline of every x86-64 CPU since 2013),
// scalar reference otherwise (then gguf_linear_vectorized() is false and callers use their torch path). The chunk
// decoders are AVX2 in both vector builds; only the FMA side widens with AVX-512. With AVX512-BF16, bf16 x meets
// the codes as bf16 in vdpbf16ps (dot_row_bf16: exact products, fp32 sums, so still dequantize-then-matmul up
// to fp32 rounding; Q8_0 and fp32 x take the FMA path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"
#include "gguf_format.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FRUGALLM_GGUF_VEC 1
#if defined(__AVX512F__)
#define FRUGALLM_GGUF_AVX512 1
#endif
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

using namespace frugallm::gguf;

// 6-bit (scale, min) of sub-block j of a Q4_K / Q5_K block from its 12 packed bytes.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Signed 6-bit scale k (of 16) of a Q3_K block from its 12 packed bytes.
inline int q3k_scale(const uint8_t* s, int k) {
  return (((s[k % 8] >> (4 * (k / 8))) & 0xF) | (((s[8 + k % 4] >> (2 * (k / 4))) & 3) << 4)) - 32;
}

// One chunk of 32 values: w[i] = s[i / 16] * q[i] - o[i / 16].
struct Params {
  float s0, s1, o0, o1;
};
inline Params same(float s, float o) { return {s, s, o, o}; }

#if defined(FRUGALLM_GGUF_VEC)
using Codes = __m256i;  // 32 int8 codes

inline __m256i sub8(__m256i v, int c) { return _mm256_sub_epi8(v, _mm256_set1_epi8(static_cast<char>(c))); }
#else
struct Codes {
  int8_t q[32];
};
#endif

// Calls sink(chunk, codes, params) for the nblocks blocks of one weight row, chunk = index of the 32-value run.
template <int64_t T, class Sink>
inline void decode_row(const uint8_t* row, int64_t nblocks, Sink&& sink) {
  constexpr Format f = T == Q4_0 ? Format{32, 18} : T == Q4_1 ? Format{32, 20} : T == Q5_0 ? Format{32, 22}
                     : T == Q5_1 ? Format{32, 24} : T == Q8_0 ? Format{32, 34} : T == Q2_K ? Format{256, 84}
                     : T == Q3_K ? Format{256, 110} : T == Q4_K ? Format{256, 144} : T == Q5_K ? Format{256, 176}
                                                                                     : Format{256, 210};
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = row + blk * f.bytes;
    const int64_t c0 = blk * (f.block / 32);
    if constexpr (T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1 || T == Q8_0) {
      const float d = f16(b);
      const float m = (T == Q4_1 || T == Q5_1) ? f16(b + 2) : 0.0f;
      const Params p = same(d, -m);  // d * q + m == d * q - (-m) exactly
#if defined(FRUGALLM_GGUF_VEC)
      Codes q;
      if constexpr (T == Q4_0) q = sub8(nibbles16(b + 2), 8);
      if constexpr (T == Q4_1) q = nibbles16(b + 4);
      if constexpr (T == Q5_0) q = sub8(_mm256_or_si256(nibbles16(b + 6), bits32_x16(b + 2)), 16);
      if constexpr (T == Q5_1) q = _mm256_or_si256(nibbles16(b + 8), bits32_x16(b + 4));
      if constexpr (T == Q8_0) q = load32(b + 2);
#else
      Codes q;
      for (int i = 0; i < 32; ++i) {
        if constexpr (T == Q8_0) {
          q.q[i] = static_cast<int8_t>(b[2 + i]);
        } else {
          const int off = (T == Q4_0) ? 2 : (T == Q4_1) ? 4 : (T == Q5_0) ? 6 : 8;
          int v = i < 16 ? (b[off + i] & 0xF) : (b[off + i - 16] >> 4);
          if constexpr (T == Q5_0 || T == Q5_1) {
            const uint8_t* qh = b + (T == Q5_0 ? 2 : 4);
            v |= ((qh[i / 8] >> (i % 8)) & 1) << 4;
          }
          q.q[i] = static_cast<int8_t>(v - (T == Q4_0 ? 8 : T == Q5_0 ? 16 : 0));
        }
      }
#endif
      sink(c0, q, p);
    } else if constexpr (T == Q4_K || T == Q5_K) {
      const float d = f16(b), dmin = f16(b + 2);
      const uint8_t* sc = b + 4;
      const uint8_t* qh = b + 16;  // Q5_K only
      const uint8_t* qs = b + (T == Q4_K ? 16 : 48);
#if defined(FRUGALLM_GGUF_VEC)
      __m256i hbits = _mm256_setzero_si256();
      if constexpr (T == Q5_K) hbits = load32(qh);
#endif
      for (int pair = 0; pair < 4; ++pair) {
#if defined(FRUGALLM_GGUF_VEC)
        const __m256i v = load32(qs + 32 * pair);
#endif
        for (int half = 0; half < 2; ++half) {
          const int s = 2 * pair + half;
          int scv, mnv;
          k_scale_min(sc, s, scv, mnv);
          const Params p = same(d * static_cast<float>(scv), dmin * static_cast<float>(mnv));
#if defined(FRUGALLM_GGUF_VEC)
          Codes q = half ? nib_hi(v) : nib_lo(v);
          if constexpr (T == Q5_K) q = _mm256_or_si256(q, _mm256_slli_epi16(bits_at(hbits, s, 1), 4));
#else
          Codes q;
          for (int i = 0; i < 32; ++i) {
            int c = (qs[32 * pair + i] >> (4 * half)) & 0xF;
            if constexpr (T == Q5_K) c |= ((qh[i] >> s) & 1) << 4;
            q.q[i] = static_cast<int8_t>(c);
          }
#endif
          sink(c0 + s, q, p);
        }
      }
    } else if constexpr (T == Q6_K) {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16(b + 208);
      for (int h = 0; h < 2; ++h) {
#if defined(FRUGALLM_GGUF_VEC)
        const __m256i l0 = load32(ql + 64 * h), l1 = load32(ql + 64 * h + 32), hi = load32(qh + 32 * h);
#endif
        for (int c = 0; c < 4; ++c) {
          const int g = 8 * h + 2 * c;  // scale of the first 16 values
          const Params p{d * static_cast<float>(sc[g]), d * static_cast<float>(sc[g + 1]), 0.0f, 0.0f};
#if defined(FRUGALLM_GGUF_VEC)
          const __m256i src = (c & 1) ? l1 : l0;
          const __m256i lo = c < 2 ? nib_lo(src) : nib_hi(src);
          const Codes q = sub8(_mm256_or_si256(lo, _mm256_slli_epi16(bits_at(hi, 2 * c, 3), 4)), 32);
#else
          Codes q;
          for (int i = 0; i < 32; ++i) {
            const int lo = (ql[64 * h + 32 * (c & 1) + i] >> (4 * (c / 2))) & 0xF;
            const int hb = (qh[32 * h + i] >> (2 * c)) & 3;
            q.q[i] = static_cast<int8_t>((lo | (hb << 4)) - 32);
          }
#endif
          sink(c0 + 4 * h + c, q, p);
        }
      }
    } else {  // Q2_K, Q3_K: 2-bit codes, byte i of a 32-byte run holds values i, 32 + i, 64 + i, 96 + i
      const uint8_t* qs = b + (T == Q2_K ? 16 : 32);
      const float d = f16(b + (T == Q2_K ? 80 : 108));
      const float dmin = T == Q2_K ? f16(b + 82) : 0.0f;
#if defined(FRUGALLM_GGUF_VEC)
      __m256i hmask = _mm256_setzero_si256();
      if constexpr (T == Q3_K) hmask = load32(b);
#endif
      for (int h = 0; h < 2; ++h) {
#if defined(FRUGALLM_GGUF_VEC)
        const __m256i v = load32(qs + 32 * h);
#endif
        for (int j = 0; j < 4; ++j) {
          const int c = 4 * h + j, g = 2 * c;  // chunk in block, scale group of its first 16 values
          Params p;
          if constexpr (T == Q2_K) {
            const uint8_t* s = b;
            p = {d * static_cast<float>(s[g] & 0xF), d * static_cast<float>(s[g + 1] & 0xF),
                 dmin * static_cast<float>(s[g] >> 4), dmin * static_cast<float>(s[g + 1] >> 4)};
          } else {
            p = {d * static_cast<float>(q3k_scale(b + 96, g)), d * static_cast<float>(q3k_scale(b + 96, g + 1)),
                 0.0f, 0.0f};
          }
#if defined(FRUGALLM_GGUF_VEC)
          Codes q = bits_at(v, 2 * j, 3);
          // Q3_K: q - 4 where the high-mask bit is clear.
          if constexpr (T == Q3_K) q = sub8(_mm256_or_si256(q, _mm256_slli_epi16(bits_at(hmask, c, 1), 2)), 4);
#else
          Codes q;
          for (int i = 0; i < 32; ++i) {
            int v2 = (qs[32 * h + i] >> (2 * j)) & 3;
            if constexpr (T == Q3_K) v2 -= ((b[i] >> c) & 1) ? 0 : 4;
            q.q[i] = static_cast<int8_t>(v2);
          }
#endif
          sink(c0 + c, q, p);
        }
      }
    }
  }
}

// decode_row with the type chosen at run time.
template <class Sink>
void dispatch(int64_t qtype, const uint8_t* row, int64_t nblocks, Sink&& sink) {
  switch (qtype) {
    case Q4_0: return decode_row<Q4_0>(row, nblocks, sink);
    case Q4_1: return decode_row<Q4_1>(row, nblocks, sink);
    case Q5_0: return decode_row<Q5_0>(row, nblocks, sink);
    case Q5_1: return decode_row<Q5_1>(row, nblocks, sink);
    case Q8_0: return decode_row<Q8_0>(row, nblocks, sink);
    case Q2_K: return decode_row<Q2_K>(row, nblocks, sink);
    case Q3_K: return decode_row<Q3_K>(row, nblocks, sink);
    case Q4_K: return decode_row<Q4_K>(row, nblocks, sink);
    case Q5_K: return decode_row<Q5_K>(row, nblocks, sink);
    case Q6_K: return decode_row<Q6_K>(row, nblocks, sink);
    default: TORCH_CHECK(false, "unreachable qtype ", qtype);
  }
}

constexpr int64_t kMaxRows = 4;  // inputs per pass over a weight row (accumulators in registers)
// The bf16 path keeps 2 zmm accumulators per input: 8 inputs per pass (16 of the 32 registers) decode each block
// once for 8, 1.07-1.3x the 4-input pass at 5-9 rows for Q4_0/Q4_1/Q6_K. Q4_K also keeps 8 ymm offsets per input
// (4 per pass: 8 measured no faster, its cost being the products, not the decode).
constexpr int64_t kMaxRowsBf16 = 8;

#if defined(FRUGALLM_GGUF_VEC)
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif
#if defined(FRUGALLM_GGUF_AVX512)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// out[m] = row . x[m] for MC inputs x (fp32, row-major with stride k).
template <int64_t T, int MC>
void dot_row(const uint8_t* row, int64_t nblocks, const float* x, int64_t k, float* out) {
#if defined(FRUGALLM_GGUF_AVX512)
  constexpr int A = MC == 1 ? 4 : 2;  // accumulators per input: independent FMA chains
  __m512 acc[MC][A];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  int parity = 0;
  decode_row<T>(row, nblocks, [&](int64_t c, Codes q, Params p) {
    const __m512 w0 = _mm512_fmsub_ps(_mm512_set1_ps(p.s0), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                 _mm256_castsi256_si128(q))), _mm512_set1_ps(p.o0));
    const __m512 w1 = _mm512_fmsub_ps(_mm512_set1_ps(p.s1), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                 _mm256_extracti128_si256(q, 1))), _mm512_set1_ps(p.o1));
    const int a0 = A == 4 ? 2 * parity : 0;
    for (int m = 0; m < MC; ++m) {
      const float* xm = x + m * k + 32 * c;
      acc[m][a0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][a0]);
      acc[m][a0 + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][a0 + 1]);
    }
    parity ^= 1;
  });
  for (int m = 0; m < MC; ++m) {
    __m512 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[m][a]);
    out[m] = hsum(s);
  }
#elif defined(FRUGALLM_GGUF_VEC)
  __m256 acc[MC][4];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm256_setzero_ps();
  decode_row<T>(row, nblocks, [&](int64_t c, Codes q, Params p) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m256 s0 = _mm256_set1_ps(p.s0), s1 = _mm256_set1_ps(p.s1);
    const __m256 o0 = _mm256_set1_ps(p.o0), o1 = _mm256_set1_ps(p.o1);
    const __m256 w[4] = {
        _mm256_fmsub_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), o0),
        _mm256_fmsub_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), o0),
        _mm256_fmsub_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), o1),
        _mm256_fmsub_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), o1)};
    for (int m = 0; m < MC; ++m) {
      const float* xm = x + m * k + 32 * c;
      for (int a = 0; a < 4; ++a) acc[m][a] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(xm + 8 * a), acc[m][a]);
    }
  });
  for (int m = 0; m < MC; ++m)
    out[m] = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
#else
  float acc[MC] = {};
  decode_row<T>(row, nblocks, [&](int64_t c, const Codes& q, Params p) {
    for (int i = 0; i < 32; ++i) {
      const float w = (i < 16 ? p.s0 : p.s1) * static_cast<float>(q.q[i]) - (i < 16 ? p.o0 : p.o1);
      for (int m = 0; m < MC; ++m) acc[m] += w * x[m * k + 32 * c + i];
    }
  });
  for (int m = 0; m < MC; ++m) out[m] = acc[m];
#endif
}

#if defined(FRUGALLM_GGUF_VEC)
// The vector GEMV. Each weight value is s * q - o with q a small integer code, s and o per group of 16 or 32
// values, so a row's dot with x is sum over groups of s * (sum q x) - o * (sum x): the codes convert exactly
// to fp32 and meet x in FMAs, each group's scale multiplies its partial sum once, and the offsets meet the
// per-group sums of x (computed once per call, shared by every weight row). Same products as dequantize-then-
// matmul, summed in another order: equal up to fp32 rounding.
#if defined(FRUGALLM_GGUF_AVX512)
using VF = __m512;
constexpr int kLanes = 16;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float s) { return _mm512_set1_ps(s); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
// kLanes int8 codes at p as fp32.
inline VF codes_i8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p))); }
// kLanes bytes at p: their low nibbles and their high nibbles as fp32.
inline void codes_nib(const uint8_t* p, VF& lo, VF& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(load16(p));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
#else
using VF = __m256;
constexpr int kLanes = 8;
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float s) { return _mm256_set1_ps(s); }
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline float vsum(VF v) { return hsum(v); }
inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline VF codes_i8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p))); }
inline void codes_nib(const uint8_t* p, VF& lo, VF& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(load8(p));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
#endif

// 8 bytes at p as 8 fp32 lanes (unsigned).
inline __m256 u8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 i8x8(const void* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Per-block scales (and offsets) of a K-quant block as fp32, one per group of G values; returns G.
template <int64_t T>
inline void k_params(const uint8_t* b, float* sc, __m256& mn_lo, __m256& mn_hi) {
  if constexpr (T == Q4_K || T == Q5_K) {  // 8 groups of 32: 6-bit (scale, min) packed in 12 bytes
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3f;
    _mm256_storeu_ps(sc, _mm256_mul_ps(_mm256_set1_ps(f16(b)), u8x8(reinterpret_cast<const uint8_t*>(u))));
    mn_lo = _mm256_mul_ps(_mm256_set1_ps(f16(b + 2)), u8x8(reinterpret_cast<const uint8_t*>(u + 2)));
  } else if constexpr (T == Q6_K) {  // 16 groups of 16: int8 scales
    const __m256 d = _mm256_set1_ps(f16(b + 208));
    _mm256_storeu_ps(sc, _mm256_mul_ps(d, i8x8(b + 192)));
    _mm256_storeu_ps(sc + 8, _mm256_mul_ps(d, i8x8(b + 200)));
  } else if constexpr (T == Q2_K) {  // 16 groups of 16: scale | min << 4
    const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    const __m128i lo = _mm_and_si128(s, _mm_set1_epi8(0xF)), hi = _mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(0xF));
    const __m256 d = _mm256_set1_ps(f16(b + 80)), dmin = _mm256_set1_ps(f16(b + 82));
    _mm256_storeu_ps(sc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))));
    _mm256_storeu_ps(sc + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))));
    mn_lo = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)));
    mn_hi = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))));
  } else {  // Q3_K: 16 signed 6-bit scales
    const float d = f16(b + 108);
    for (int g = 0; g < 16; ++g) sc[g] = d * static_cast<float>(q3k_scale(b + 96, g));
  }
}

// out[m] = row . x[m] for MC inputs x (fp32, stride k). xs holds, per input, its sums over each 16 values (k / 16)
// then over each 32 (k / 32).
template <int64_t T, int MC>
void dot_row_vec(const uint8_t* row, int64_t nblocks, const float* x, int64_t k, const float* xs, float* out) {
  const int64_t xs_stride = k / 16 + k / 32;
  const float* xs16 = xs;
  const float* xs32 = xs + k / 16;
  VF t0[MC], t1[MC];
  __m256 off[MC];
  float offs[MC];
  for (int m = 0; m < MC; ++m) {
    t0[m] = t1[m] = vzero();
    off[m] = _mm256_setzero_ps();
    offs[m] = 0.0f;
  }
  if constexpr (T == Q4_0 || T == Q4_1 || T == Q8_0) {
    constexpr int64_t bytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34;
    auto block = [&](int64_t blk, VF* t) {
      const uint8_t* b = row + blk * bytes;
      const float d = f16(b);
      // Q4_0: d * (q - 8) = d * q - 8 d; Q4_1: d * q + m.
      const float o = T == Q4_0 ? 8.0f * d : T == Q4_1 ? -f16(b + 2) : 0.0f;
      VF acc[MC];
      for (int m = 0; m < MC; ++m) acc[m] = vzero();
      if constexpr (T == Q8_0) {
        for (int j = 0; j < 32; j += kLanes) {
          const VF q = codes_i8(b + 2 + j);
          for (int m = 0; m < MC; ++m) acc[m] = vfma(q, vload(x + m * k + 32 * blk + j), acc[m]);
        }
      } else {
        for (int j = 0; j < 16; j += kLanes) {
          VF lo, hi;
          codes_nib(b + (T == Q4_0 ? 2 : 4) + j, lo, hi);
          for (int m = 0; m < MC; ++m) {
            const float* xm = x + m * k + 32 * blk + j;
            acc[m] = vfma(hi, vload(xm + 16), vfma(lo, vload(xm), acc[m]));
          }
        }
      }
      const VF dv = vset1(d);
      for (int m = 0; m < MC; ++m) {
        t[m] = vfma(dv, acc[m], t[m]);
        if constexpr (T != Q8_0) offs[m] += o * xs32[m * xs_stride + blk];
      }
    };
    // Two blocks per step, each into its own accumulators: two FMA chains through the scales.
    int64_t blk = 0;
    for (; blk + 1 < nblocks; blk += 2) {
      block(blk, t0);
      block(blk + 1, t1);
    }
    if (blk < nblocks) block(blk, t0);
  } else if constexpr (T == Q5_0 || T == Q5_1) {
    // decode_row's int8 codes of up to 8 blocks at a time through a buffer (written whole before it is read).
    constexpr int64_t bytes = T == Q5_0 ? 22 : 24;
    alignas(32) uint8_t buf[256];
    alignas(32) float sc[8], oo[8];
    auto chunk = [&](int64_t b0, int64_t c, VF* t) {
      VF a[MC];
      for (int m = 0; m < MC; ++m) a[m] = vzero();
      for (int j = 0; j < 32; j += kLanes) {
        const VF q = codes_i8(buf + 32 * c + j);
        for (int m = 0; m < MC; ++m) a[m] = vfma(q, vload(x + m * k + 32 * (b0 + c) + j), a[m]);
      }
      const VF s = vset1(sc[c]);
      for (int m = 0; m < MC; ++m) {
        t[m] = vfma(s, a[m], t[m]);
        if constexpr (T == Q5_1) offs[m] += oo[c] * xs32[m * xs_stride + b0 + c];
      }
    };
    for (int64_t b0 = 0; b0 < nblocks; b0 += 8) {
      const int64_t nb = std::min<int64_t>(8, nblocks - b0);
      decode_row<T>(row + b0 * bytes, nb, [&](int64_t c, Codes q, Params p) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(buf + 32 * c), q);
        sc[c] = p.s0;
        oo[c] = p.o0;
      });
      int64_t c = 0;
      for (; c + 1 < nb; c += 2) {
        chunk(b0, c, t0);
        chunk(b0, c + 1, t1);
      }
      if (c < nb) chunk(b0, c, t0);
    }
  } else {  // K-quants: per block, its scales as fp32 and its codes (decoded in registers or through a buffer)
    constexpr int64_t bytes = T == Q2_K ? 84 : T == Q3_K ? 110 : T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
    constexpr int G = (T == Q4_K || T == Q5_K) ? 32 : 16;  // values per scale
    alignas(32) float sc[16];
    alignas(32) uint8_t buf[256];
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * bytes;
      if (blk + 1 < nblocks) _mm_prefetch(reinterpret_cast<const char*>(b + bytes + 128), _MM_HINT_T0);
      __m256 mn_lo, mn_hi;
      k_params<T>(b, sc, mn_lo, mn_hi);
      if constexpr (T == Q4_K) {
        const uint8_t* qs = b + 16;
        for (int pair = 0; pair < 4; ++pair) {
          VF alo[MC], ahi[MC];
          for (int m = 0; m < MC; ++m) alo[m] = ahi[m] = vzero();
          for (int j = 0; j < 32; j += kLanes) {
            VF lo, hi;
            codes_nib(qs + 32 * pair + j, lo, hi);
            for (int m = 0; m < MC; ++m) {
              const float* xm = x + m * k + 256 * blk + 64 * pair + j;
              alo[m] = vfma(lo, vload(xm), alo[m]);
              ahi[m] = vfma(hi, vload(xm + 32), ahi[m]);
            }
          }
          const VF s0 = vset1(sc[2 * pair]), s1 = vset1(sc[2 * pair + 1]);
          for (int m = 0; m < MC; ++m) {
            t0[m] = vfma(s0, alo[m], t0[m]);
            t1[m] = vfma(s1, ahi[m], t1[m]);
          }
        }
      } else {
        decode_row<T>(b, 1, [&](int64_t c, Codes q, Params) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(buf + 32 * c), q);
        });
        for (int g = 0; g < 256 / G; ++g) {
          VF a[MC];
          for (int m = 0; m < MC; ++m) a[m] = vzero();
          for (int j = 0; j < G; j += kLanes) {
            const VF q = codes_i8(buf + G * g + j);
            for (int m = 0; m < MC; ++m) a[m] = vfma(q, vload(x + m * k + 256 * blk + G * g + j), a[m]);
          }
          const VF s = vset1(sc[g]);
          for (int m = 0; m < MC; ++m) {
            if (g & 1)
              t1[m] = vfma(s, a[m], t1[m]);
            else
              t0[m] = vfma(s, a[m], t0[m]);
          }
        }
      }
      for (int m = 0; m < MC; ++m) {
        if constexpr (T == Q4_K || T == Q5_K) {
          off[m] = _mm256_fmadd_ps(mn_lo, _mm256_loadu_ps(xs32 + m * xs_stride + 8 * blk), off[m]);
        } else if constexpr (T == Q2_K) {
          off[m] = _mm256_fmadd_ps(mn_lo, _mm256_loadu_ps(xs16 + m * xs_stride + 16 * blk), off[m]);
          off[m] = _mm256_fmadd_ps(mn_hi, _mm256_loadu_ps(xs16 + m * xs_stride + 16 * blk + 8), off[m]);
        }
      }
    }
  }
  for (int m = 0; m < MC; ++m) out[m] = vsum(vadd(t0[m], t1[m])) - (hsum(off[m]) + offs[m]);
}
#endif

#if defined(FRUGALLM_GGUF_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FRUGALLM_GGUF_BF16 1
// The bf16 GEMV (x already bf16). Every code is a small integer, exact in bf16, so vdpbf16ps multiplies 32 codes
// with 32 bf16 inputs exactly (products of two 8-bit significands are exact in fp32) and sums them in fp32:
// the same products as the fp32 path, summed in another order. Codes become bf16 through a table lookup
// (vpermw / vpermt2w on the code's low 5 / 6 bits: entry i holds the value of code i in two's complement), so no
// bias is added to them and subtracted again (no cancellation beyond the fp32 path's). Q8_0's 8-bit codes do not
// fit the 64-entry table: Q8_0 keeps the fp32 path (on x widened once per call). A chunk's
// dpbf16 lane j holds values 2j and 2j + 1: lanes 0-7 the first 16 values, 8-15 the second, so the two 16-value
// scales of a chunk multiply it as one vector. Offsets meet the per-group sums of x, as in the fp32 path.
struct Bf16Tables {
  __m512i lo, hi;  // value of 6-bit two's complement code i: entries 0-31 (lo) and 32-63 (hi)
  __m512i nib;     // nibble codes: entry i holds i & 15 (vpermw reads an index's low 5 bits: no mask needed)
};
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // exact for the small integers stored here
}
inline Bf16Tables bf16_tables() {
  alignas(64) uint16_t t[96];
  for (int i = 0; i < 64; ++i) t[i] = bf16_bits(static_cast<float>(i < 32 ? i : i - 64));
  for (int i = 0; i < 32; ++i) t[64 + i] = bf16_bits(static_cast<float>(i & 15));
  return {_mm512_load_si512(t), _mm512_load_si512(t + 32), _mm512_load_si512(t + 64)};
}
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// Q4_K's order of x (see dot_row_bf16): per 128 values at v0, entry 32 r + 2 i + s is value v0 + 64 (t / 32) +
// 32 (r % 2) + t % 32 with t = 4 i + 2 s + r / 2 (the byte of dword i, half s, field r).
inline void q4k_permute_x(const uint16_t* x, int64_t k, uint16_t* out) {
  for (int64_t v0 = 0; v0 < k; v0 += 128)
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 16; ++i)
        for (int s = 0; s < 2; ++s) {
          const int t = 4 * i + 2 * s + r / 2;
          out[v0 + 32 * r + 2 * i + s] = x[v0 + 64 * (t / 32) + 32 * (r % 2) + t % 32];
        }
}

// out[m] = row . x[m] for MC bf16 inputs x (stride k); xs as in dot_row_vec (fp32 sums of the bf16 values).
template <int64_t T, int MC>
void dot_row_bf16(const uint8_t* row, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs, float* out) {
  const int64_t xs_stride = k / 16 + k / 32;
  const float* xs16 = xs;
  const float* xs32 = xs + k / 16;
  const Bf16Tables tb = bf16_tables();
  __m512 t0[MC], t1[MC];
  __m256 off[MC];
  float offs[MC];
  for (int m = 0; m < MC; ++m) {
    t0[m] = t1[m] = _mm512_setzero_ps();
    off[m] = _mm256_setzero_ps();
    offs[m] = 0.0f;
  }
  if constexpr (T == Q4_K) {
    // No shuffles: 64 bytes of nibbles (two pairs of sub-blocks) are read as 16 dwords and each 4-bit field of
    // their two 16-bit halves becomes bf16 128 + q with one shift and one vpternlogd (0x4300 | q is exact), so
    // x comes pre-permuted to that order (q4k_permute_x: per 128 values [field r][dword i][half]). Fields 0 and
    // 2 hold sub-blocks 4H (dwords 0-7) and 4H + 2 (8-15), fields 1 and 3 sub-blocks 4H + 1 and 4H + 3: two
    // chained vdpbf16ps per pair of fields, then one FMA with the two sub-blocks' scales. The bias (128 * scale
    // * sum of the sub-block's x) joins the offsets: (min + 128 * scale) * sum x.
    const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    const __m512i idx_a = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256 bias = _mm256_set1_ps(128.0f);
    alignas(32) float sc[16];
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * 144;
      if (blk + 1 < nblocks) _mm_prefetch(reinterpret_cast<const char*>(b + 144 + 128), _MM_HINT_T0);
      __m256 mn_lo, mn_hi;
      k_params<T>(b, sc, mn_lo, mn_hi);
      const __m256 scv = _mm256_load_ps(sc);
      const __m512 scz = _mm512_castps256_ps512(scv);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i d = _mm512_loadu_si512(b + 16 + 64 * h);
        const __m512bh p0 = as_bh(_mm512_ternarylogic_epi32(d, nib, magic, 0xEA));
        const __m512bh p1 = as_bh(_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), nib, magic, 0xEA));
        const __m512bh p2 = as_bh(_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 8), nib, magic, 0xEA));
        const __m512bh p3 = as_bh(_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 12), nib, magic, 0xEA));
        const __m512 sa = _mm512_permutexvar_ps(_mm512_add_epi32(idx_a, _mm512_set1_epi32(4 * h)), scz);
        const __m512 sb = _mm512_permutexvar_ps(_mm512_add_epi32(idx_a, _mm512_set1_epi32(4 * h + 1)), scz);
        for (int m = 0; m < MC; ++m) {
          const uint16_t* xm = x + m * k + 256 * blk + 128 * h;
          const __m512 a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), p0, load_bh(xm)), p2, load_bh(xm + 64));
          const __m512 c = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), p1, load_bh(xm + 32)), p3, load_bh(xm + 96));
          t0[m] = _mm512_fmadd_ps(a, sa, t0[m]);
          t1[m] = _mm512_fmadd_ps(c, sb, t1[m]);
        }
      }
      const __m256 mn = _mm256_fmadd_ps(bias, scv, mn_lo);
      for (int m = 0; m < MC; ++m)
        off[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xs32 + m * xs_stride + 8 * blk), off[m]);
    }
  } else if constexpr (T == Q4_0 || T == Q4_1) {
    // A block's 16 bytes in both halves of 32 16-bit lanes, shifted by 0 (values 0-15) and 4 (16-31): one
    // lookup in the nibble table gives the chunk (Q4_0 adds -8 to its scale's multiplier: d * (q - 8) =
    // d * q - 8 d, the offset meeting the block's sum of x).
    constexpr int64_t bytes = T == Q4_0 ? 18 : 20;
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    float offs1[MC];
    for (int m = 0; m < MC; ++m) offs1[m] = 0.0f;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * bytes;
      const float d = f16(b);
      const float o = T == Q4_0 ? 8.0f * d : -f16(b + 2);
      const __m512i v = _mm512_srlv_epi16(
          _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(load16(b + (T == Q4_0 ? 2 : 4)))), shifts);
      const __m512bh w = as_bh(_mm512_permutexvar_epi16(v, tb.nib));
      const __m512 s = _mm512_set1_ps(d);
      for (int m = 0; m < MC; ++m) {
        t0[m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w, load_bh(x + m * k + 32 * blk)), s, t0[m]);
        offs1[m] += o * xs32[m * xs_stride + blk];
        std::swap(t0[m], t1[m]);
        std::swap(offs[m], offs1[m]);
      }
    }
    for (int m = 0; m < MC; ++m) offs[m] += offs1[m];
  } else if constexpr (T == Q6_K) {
    // 6-bit codes assembled in 16-bit lanes (low nibble | 2 high bits << 4, 0-63) index the table as q - 32;
    // a chunk's two 16-value scales come from the block's 16 with one permute.
    const __m512i nib = _mm512_set1_epi16(0xF), top2 = _mm512_set1_epi16(0x30);
    const __m512i pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    alignas(64) float sc[16];
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * 210;
      if (blk + 1 < nblocks) _mm_prefetch(reinterpret_cast<const char*>(b + 210 + 128), _MM_HINT_T0);
      __m256 unused_lo, unused_hi;
      k_params<T>(b, sc, unused_lo, unused_hi);
      const __m512 scz = _mm512_load_ps(sc);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i l0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h)));
        const __m512i l1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32)));
        const __m512i hb = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m512i src = (c & 1) ? l1 : l0;
          const __m512i lo = c < 2 ? _mm512_and_si512(src, nib) : _mm512_srli_epi16(src, 4);
          const __m512i hs = c == 0 ? _mm512_slli_epi16(hb, 4) : c == 1 ? _mm512_slli_epi16(hb, 2)
                           : c == 2 ? hb : _mm512_srli_epi16(hb, 2);
          const __m512i code = _mm512_ternarylogic_epi32(lo, hs, top2, 0xF8);  // lo | (hs & 0x30)
          const __m512bh w = as_bh(_mm512_permutex2var_epi16(tb.hi, code, tb.lo));  // code - 32
          const __m512 s = _mm512_permutexvar_ps(_mm512_add_epi32(pair_idx, _mm512_set1_epi32(8 * h + 2 * c)), scz);
          for (int m = 0; m < MC; ++m) {
            const __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, load_bh(x + m * k + 256 * blk + 128 * h + 32 * c));
            if (c & 1)
              t1[m] = _mm512_fmadd_ps(d, s, t1[m]);
            else
              t0[m] = _mm512_fmadd_ps(d, s, t0[m]);
          }
        }
      }
    }
  } else {
    // Every other type through decode_row's int8 codes (all within [-32, 31]).
    const __m512i half_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    decode_row<T>(row, nblocks, [&](int64_t c, Codes q, Params p) {
      const __m512bh w = as_bh(_mm512_permutex2var_epi16(tb.lo, _mm512_cvtepi8_epi16(q), tb.hi));
      constexpr bool one_scale = !(T == Q6_K || T == Q3_K || T == Q2_K);
      __m512 s;
      if constexpr (one_scale)
        s = _mm512_set1_ps(p.s0);
      else
        s = _mm512_permutexvar_ps(half_idx, _mm512_castps128_ps512(_mm_unpacklo_ps(_mm_set_ss(p.s0), _mm_set_ss(p.s1))));
      for (int m = 0; m < MC; ++m) {
        const uint16_t* xm = x + m * k + 32 * c;
        const __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, load_bh(xm));
        t0[m] = _mm512_fmadd_ps(d, s, t0[m]);
        if constexpr (T == Q4_1 || T == Q5_1 || T == Q5_K) offs[m] += p.o0 * xs32[m * xs_stride + c];
        if constexpr (T == Q2_K)
          offs[m] += p.o0 * xs16[m * xs_stride + 2 * c] + p.o1 * xs16[m * xs_stride + 2 * c + 1];
      }
      for (int m = 0; m < MC; ++m) std::swap(t0[m], t1[m]);  // two FMA chains, alternating chunk by chunk
    });
  }
  for (int m = 0; m < MC; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(t0[m], t1[m])) - (hsum(off[m]) + offs[m]);
}

using DotBf16Fn = void (*)(const uint8_t*, int64_t, const uint16_t*, int64_t, const float*, int64_t, float*);
template <int64_t T>
void dot_rows_bf16(const uint8_t* row, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs, int64_t mc,
                   float* out) {
  switch (mc) {
    case 1: return dot_row_bf16<T, 1>(row, nblocks, x, k, xs, out);
    case 2: return dot_row_bf16<T, 2>(row, nblocks, x, k, xs, out);
    case 3: return dot_row_bf16<T, 3>(row, nblocks, x, k, xs, out);
    case 4: return dot_row_bf16<T, 4>(row, nblocks, x, k, xs, out);
    case 5: return dot_row_bf16<T, 5>(row, nblocks, x, k, xs, out);
    case 6: return dot_row_bf16<T, 6>(row, nblocks, x, k, xs, out);
    case 7: return dot_row_bf16<T, 7>(row, nblocks, x, k, xs, out);
    default: return dot_row_bf16<T, 8>(row, nblocks, x, k, xs, out);
  }
}
DotBf16Fn dot_bf16_fn(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return &dot_rows_bf16<Q4_0>;
    case Q4_1: return &dot_rows_bf16<Q4_1>;
    case Q5_0: return &dot_rows_bf16<Q5_0>;
    case Q5_1: return &dot_rows_bf16<Q5_1>;
    // Q8_0 (8-bit codes: two lookups and two vdpbf16ps per chunk measured slower than the fp32 path): nullptr.
    case Q2_K: return &dot_rows_bf16<Q2_K>;
    case Q3_K: return &dot_rows_bf16<Q3_K>;
    case Q4_K: return &dot_rows_bf16<Q4_K>;
    case Q5_K: return &dot_rows_bf16<Q5_K>;
    case Q6_K: return &dot_rows_bf16<Q6_K>;
    default: return nullptr;
  }
}
#endif

// Rows of x at a time: the vector kernel (which reads xs, x's sums over 16 values) or the scalar reference.
template <int64_t T>
void dot_rows(const uint8_t* row, int64_t nblocks, const float* x, int64_t k, const float* xs, int64_t mc,
              float* out) {
#if defined(FRUGALLM_GGUF_VEC)
  switch (mc) {
    case 1: return dot_row_vec<T, 1>(row, nblocks, x, k, xs, out);
    case 2: return dot_row_vec<T, 2>(row, nblocks, x, k, xs, out);
    case 3: return dot_row_vec<T, 3>(row, nblocks, x, k, xs, out);
    default: return dot_row_vec<T, 4>(row, nblocks, x, k, xs, out);
  }
#else
  (void)xs;
  switch (mc) {
    case 1: return dot_row<T, 1>(row, nblocks, x, k, out);
    case 2: return dot_row<T, 2>(row, nblocks, x, k, out);
    case 3: return dot_row<T, 3>(row, nblocks, x, k, out);
    default: return dot_row<T, 4>(row, nblocks, x, k, out);
  }
#endif
}

using DotFn = void (*)(const uint8_t*, int64_t, const float*, int64_t, const float*, int64_t, float*);
DotFn dot_fn(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return &dot_rows<Q4_0>;
    case Q4_1: return &dot_rows<Q4_1>;
    case Q5_0: return &dot_rows<Q5_0>;
    case Q5_1: return &dot_rows<Q5_1>;
    case Q8_0: return &dot_rows<Q8_0>;
    case Q2_K: return &dot_rows<Q2_K>;
    case Q3_K: return &dot_rows<Q3_K>;
    case Q4_K: return &dot_rows<Q4_K>;
    case Q5_K: return &dot_rows<Q5_K>;
    case Q6_K: return &dot_rows<Q6_K>;
    default: return nullptr;
  }
}

constexpr const char* kSupported = "Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q2_K=10, Q3_K=11, Q4_K=12, Q5_K=13, Q6_K=14";

Format check_weight(const at::Tensor& w, int64_t qtype, int64_t rows, int64_t cols) {
  return frugallm::gguf::check_weight(w, qtype, rows, cols, true, "", kSupported);
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n_out,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous float32 or bfloat16 [rows, in_features] tensor");
  const int64_t rows = x.size(0), k = x.size(1);
  const Format f = check_weight(w, qtype, n_out, k);
  const float* b = frugallm::bias_ptr(bias, n_out);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  std::vector<float> xbuf;
  if (bf16) xbuf = frugallm::rows_as_float(x);
  const float* xf = bf16 ? xbuf.data() : x.data_ptr<float>();
  at::Tensor y = at::empty({rows, n_out}, x.options());
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  auto* yb = bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), nblocks = k / f.block;
  const DotFn dot = dot_fn(qtype);
  // Per input row, its sums over each run of 16 values then over each run of 32 (the offsets' operands, shared
  // by every weight row; the scalar path ignores them).
  const int64_t ng = k / 16 + k / 32;
  std::vector<float> xs(rows * ng);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xf + r * k;
    float* s16 = xs.data() + r * ng;
    float* s32 = s16 + k / 16;
    for (int64_t g = 0; g < k / 16; ++g) {
      float s = 0.0f;
      for (int j = 0; j < 16; ++j) s += xr[16 * g + j];
      s16[g] = s;
    }
    for (int64_t g = 0; g < k / 32; ++g) s32[g] = s16[2 * g] + s16[2 * g + 1];
  }
  // Each thread a contiguous run of weight rows: one sequential stream through the blocks, read once per
  // kMaxRows inputs (a second pass over a row finds it in cache).
#if defined(FRUGALLM_GGUF_BF16)
  // bf16 x: codes meet it as it is in vdpbf16ps (exact products, fp32 sums).
  const DotBf16Fn dot_bf16 = bf16 ? dot_bf16_fn(qtype) : nullptr;
  const auto* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  std::vector<uint16_t> xperm;
  if (dot_bf16 != nullptr && qtype == Q4_K) {  // the order its shuffle-free decode produces
    xperm.resize(rows * k);
    for (int64_t r = 0; r < rows; ++r) q4k_permute_x(xb + r * k, k, xperm.data() + r * k);
    xb = xperm.data();
  }
#endif
#if defined(FRUGALLM_GGUF_BF16)
  const int64_t chunk = dot_bf16 != nullptr && qtype != Q4_K ? kMaxRowsBf16 : kMaxRows;
#else
  const int64_t chunk = kMaxRows;
#endif
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    float out[kMaxRowsBf16];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < rows; m0 += chunk) {
        const int64_t mc = std::min(chunk, rows - m0);
#if defined(FRUGALLM_GGUF_BF16)
        if (dot_bf16 != nullptr)
          dot_bf16(wp + n * row_bytes, nblocks, xb + m0 * k, k, xs.data() + m0 * ng, mc, out);
        else
#endif
          dot(wp + n * row_bytes, nblocks, xf + m0 * k, k, xs.data() + m0 * ng, mc, out);
        for (int64_t m = 0; m < mc; ++m) {
          const float v = b != nullptr ? out[m] + b[n] : out[m];
          if (bf16)
            yb[(m0 + m) * n_out + n] = frugallm::float_to_bf16(v);
          else
            yf[(m0 + m) * n_out + n] = v;
        }
      }
    }
  });
  return y;
}

// Stores 32 values w = s * q - o of one chunk at dst (as fp32, bf16 bits or fp16 bits).
template <typename Out>
inline void store_chunk(const Codes& q, Params p, Out* dst) {
#if defined(FRUGALLM_GGUF_VEC)
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int a = 0; a < 4; ++a) {
    const __m256 s = _mm256_set1_ps(a < 2 ? p.s0 : p.s1), o = _mm256_set1_ps(a < 2 ? p.o0 : p.o1);
    // Product and difference rounded apart, as the reference computes them.
    const __m256 prod = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[a])));
    const __m256 v = _mm256_sub_ps(prod, o);
    if constexpr (std::is_same_v<Out, float>) {
      _mm256_storeu_ps(dst + 8 * a, v);
    } else if constexpr (std::is_same_v<Out, c10::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * a), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {  // bf16, round to nearest even (finite values: GGUF scales are finite fp16)
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * a), packed);
    }
  }
#else
  for (int i = 0; i < 32; ++i) {
    const float prod = (i < 16 ? p.s0 : p.s1) * static_cast<float>(q.q[i]);
    const float v = prod - (i < 16 ? p.o0 : p.o1);
    if constexpr (std::is_same_v<Out, float>)
      dst[i] = v;
    else
      dst[i] = Out(v);
  }
#endif
}

at::Tensor gguf_dequantize(const at::Tensor& w, int64_t qtype, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(w.dim() == 2, "w must be a uint8 [rows, bytes_per_row] tensor");
  const int64_t rows = w.size(0);
  const Format f = check_weight(w, qtype, rows, cols);
  at::Tensor out = at::empty({rows, cols}, w.options().dtype(dtype));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), nblocks = cols / f.block;
  auto run = [&](auto* dst) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        auto* d = dst + n * cols;
        dispatch(qtype, wp + n * row_bytes, nblocks,
                 [&](int64_t c, const Codes& q, Params p) { store_chunk(q, p, d + 32 * c); });
      }
    });
  };
  if (dtype == at::kFloat) run(out.data_ptr<float>());
  else if (dtype == at::kHalf) run(out.data_ptr<c10::Half>());
  else run(out.data_ptr<c10::BFloat16>());
  return out;
}

bool gguf_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("gguf_linear(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_dequantize(Tensor w, int qtype, int cols, ScalarType dtype) -> Tensor");
  m.def("gguf_linear_vectorized() -> bool", &gguf_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("gguf_linear", &gguf_linear);
  m.impl("gguf_dequantize", &gguf_dequantize);
}
