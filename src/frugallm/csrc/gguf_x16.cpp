// requires: avx2 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Q4_K weights repacked at load with 16 weight rows interleaved ("x16b"; its prototypes, and a gather-based variant
// on the stored blocks at 0.46x of the stored-block kernel, are in git history: 8814961, 65e5f3e):
// a vector lane is one output column, so each lane accumulates its own column (no horizontal sums), the scale FMA is
// once per 32 values for 16 columns, each x value (or bf16 pair) is one broadcast shared by the 16 columns, and a
// decoded weight vector is shared by every input row. An output's arithmetic does not depend on how many rows run
// together or on the thread count: a verify pass is bit-identical to one-row decode. The layout holds exactly the
// file's 144 bytes per row per block, so repacking costs no memory.
//
// Layout, per group of 16 weight rows (columns c), per 256-value block (2304 bytes):
//   d[16] fp16 | dmin[16] fp16 | the 12 packed scale bytes as [12][16] (byte i of column c at 16 i + c) |
//   sub-blocks j = 0..7 of 256 bytes: 4 runs z of 64 bytes; column c's dword in run z holds, in 16-bit half s,
//   field r (bits 4r..4r+3), the code of value 32 j + 8 z + 2 r + s.
//
//   gguf_q4k_x16_repack(w uint8 [N, K / 256 * 144]) -> uint8 [N / 16, K / 256 * 2304]        (N % 16 == 0)
//   gguf_q4k_x16_unpack(w uint8 [N / 16, K / 256 * 2304], N, rows int64 [R]?) -> uint8 [R or N, K / 256 * 144]
//       (the stored rows back, bit for bit: gguf_dequantize on them is the reference dequantization)
//   gguf_q4k_x16_linear(x [rows, K] float32|bfloat16, w x16b, qtype (12), N, bias float32 [N]?) -> [rows, N]
//       in x's dtype: sum over sub-blocks of (d sc) * sum(x q) - (dmin m) * sum(x), fp32 accumulation, bias added in
//       fp32, one RNE rounding for bf16 output; dequantize-then-matmul up to fp32 rounding.
//
// Q6_K the same way (gguf_q6k_x16_repack / gguf_q6k_x16_unpack, the same signatures; 210 bytes per row per block):
//   d[16] fp16 | the 16 int8 scales as [16][16] | sub-blocks i = 0..15 (16 values, one scale) of 192 bytes: runs
//   z = 0..1 of 64 bytes, column c's dword in run z holding in 16-bit half s, bits 4r..4r+3, the low nibble of the
//   code of value 16 i + 8 z + 2 r + s; then a run of 64 bytes whose column dword holds that value's 2 high code
//   bits at bits 16 s + 4 r + 2 z. 16 * 210 = 3360 bytes per group per block.
//   gguf_x16_linear(x, w x16b, qtype (12 or 14), N, bias?): either type (gguf_q4k_x16_linear: Q4_K only); Q6_K is
//       sum over sub-blocks of (d sc) * (sum(x q) - 32 sum(x)), the same guarantees.
//
// Paths: bf16 x on AVX512-BF16 meets the codes as bf16 128 + q (a bit-or: 0x4300 | q) in vdpbf16ps; 128 * sum(x) of
// the sub-block is subtracted before the scale (the cancellation stays within 32 values; Q6_K: 160 * sum(x) of 16).
// fp32 x (and bf16 x on CPUs without AVX512-BF16, widened to fp32 first) converts the codes to fp32 and runs FMAs:
// 16 lanes on AVX-512, two halves of 8 on AVX2 + FMA + F16C. Q4_K's codes become fp32 by one vpermps on AVX-512
// (a 16-entry table indexed by the nibble: no mask, no int-to-float conversion). With 1-2 rows per pass, Q4_K
// interleaves 2-4 sub-blocks (independent accumulator chains) with the same per-sub-block arithmetic. At one row the
// kernel is bound by the code decode's vector ops (shifts, masks, conversions: as many as its FMAs), more than by
// the accumulators' latency: vpermps gave 1.21x at one fp32 row, interleaving 4 sub-blocks a further 1.05x (Q4_K
// 1536x8960, 1 thread, loaded machine); at AVX2 (16 ymm registers: 2 sub-blocks at one row) interleaving gave
// 1.14-1.24x; Q6_K, whose chains are half as long, gained nothing from it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"
#include "gguf_x16.h"
#include "gguf_q8_act.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__BMI2__) || defined(__AVX2__)
#include <immintrin.h>  // pext / pdep for the repack, vector intrinsics for the linear
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define X16_VEC 1
#if defined(__AVX512F__)
#define X16_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define X16_BF16 1
#endif
#endif
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

constexpr int64_t kQ4K = 12;        // GGMLQuantizationType.Q4_K
constexpr int64_t kStored = 144;    // bytes per row per block as stored
constexpr int64_t kBlock = 2304;    // bytes per 16 rows per block repacked (16 * 144)
constexpr int64_t kRowsPass = 4;    // input rows per pass of the register-only kernels (group_*<MC>)
#if defined(__AVX512F__) && defined(__FMA__) && defined(__F16C__)
constexpr int64_t kRowsWide = 16;   // input rows per pass of Q6_K's wide kernels (group6_wide_512: codes decoded once)
constexpr int kWideFrom = 5;        // Q6_K passes of at least this many rows run wide
#else
constexpr int64_t kRowsWide = kRowsPass;  // AVX2: no wide kernels
constexpr int kWideFrom = kRowsPass + 1;
#endif

constexpr int64_t kQ6K = 14;        // GGMLQuantizationType.Q6_K
constexpr int64_t kStored6 = 210;   // Q6_K bytes per row per block as stored
constexpr int64_t kBlock6 = 3360;   // Q6_K bytes per 16 rows per block repacked (16 * 210)

using frugallm::x16::pack_dword;
using frugallm::x16::unpack_dword;
constexpr frugallm::x16::Format kQ4KFormat{"Q4_K", kStored, kBlock};
constexpr frugallm::x16::Format kQ6KFormat{"Q6_K", kStored6, kBlock6};

// One stored block (16 rows' 144-byte blocks at src[c * row_bytes]) -> one repacked block, and back.
void repack_block(const uint8_t* src, int64_t row_bytes, uint8_t* dst) {
  for (int c = 0; c < 16; ++c) {
    const uint8_t* p = src + c * row_bytes;
    std::memcpy(dst + 2 * c, p, 2);
    std::memcpy(dst + 32 + 2 * c, p + 2, 2);
    for (int i = 0; i < 12; ++i) dst[64 + 16 * i + c] = p[4 + i];
    for (int j = 0; j < 8; ++j)
      for (int z = 0; z < 4; ++z) {
        uint64_t bytes;
        std::memcpy(&bytes, p + 16 + 32 * (j / 2) + 8 * z, 8);
        const uint32_t u = pack_dword(bytes, j % 2);
        std::memcpy(dst + 256 + 256 * j + 64 * z + 4 * c, &u, 4);
      }
  }
}

void unpack_row(const uint8_t* blk, int c, uint8_t* p) {  // column c of one repacked block -> its 144 bytes
  std::memcpy(p, blk + 2 * c, 2);
  std::memcpy(p + 2, blk + 32 + 2 * c, 2);
  for (int i = 0; i < 12; ++i) p[4 + i] = blk[64 + 16 * i + c];
  for (int jp = 0; jp < 4; ++jp)  // sub-blocks 2 jp (low nibbles) and 2 jp + 1 (high) share 32 qs bytes
    for (int z = 0; z < 4; ++z) {
      uint32_t lo, hi;
      std::memcpy(&lo, blk + 256 + 256 * (2 * jp) + 64 * z + 4 * c, 4);
      std::memcpy(&hi, blk + 256 + 256 * (2 * jp + 1) + 64 * z + 4 * c, 4);
      const uint64_t bytes = unpack_dword(lo, 0) | unpack_dword(hi, 1);
      std::memcpy(p + 16 + 32 * jp + 8 * z, &bytes, 8);
    }
}

at::Tensor gguf_q4k_x16_repack(const at::Tensor& w) {
  return frugallm::x16::repack(w, "gguf_q4k_x16_repack", kQ4KFormat, repack_block);
}

at::Tensor gguf_q4k_x16_unpack(const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& rows) {
  return frugallm::x16::unpack(w, n, rows, "gguf_q4k_x16_unpack", kQ4KFormat, unpack_row);
}

// ---- Q6_K ------------------------------------------------------------------------------------------------------
// Stored block (210 bytes): ql[128] | qh[64] | int8 scales[16] | d f16. Value v = 128 h + 32 qd + l (h = 0..1,
// quadrant qd = 0..3, l = 0..31) has the 6-bit code (nibble qd / 2 of ql[64 h + 32 (qd % 2) + l]) |
// (bits 2 qd..2 qd + 1 of qh[32 h + l]) << 4, weight d * scales[v / 16] * (code - 32).
inline uint64_t pext64(uint64_t x, uint64_t mask) {
#if defined(__BMI2__)
  return _pext_u64(x, mask);
#else
  uint64_t out = 0;
  for (uint64_t bit = 1; mask; mask &= mask - 1, bit <<= 1)
    if (x & mask & (~mask + 1)) out |= bit;
  return out;
#endif
}

inline uint64_t pdep64(uint64_t x, uint64_t mask) {
#if defined(__BMI2__)
  return _pdep_u64(x, mask);
#else
  uint64_t out = 0;
  for (uint64_t bit = 1; mask; mask &= mask - 1, bit <<= 1)
    if (x & bit) out |= mask & (~mask + 1);
  return out;
#endif
}

// Sub-block i (values 16 i .. 16 i + 15) reads 16 consecutive ql bytes (nibble qd / 2) and 16 consecutive qh
// bytes (bits 2 qd, 2 qd + 1): h = i / 8, qd = (i % 8) / 2, l = 16 (i % 2) + u.
inline int64_t q6_ql(int i) { return 64 * (i / 8) + 32 * ((i % 8) / 2 % 2) + 16 * (i % 2); }
inline int64_t q6_qh(int i) { return 128 + 32 * (i / 8) + 16 * (i % 2); }
// The 2 high bits of the 4 values 2 r + s (r = 0..3) among 8 qh bytes, for quadrant qd.
inline uint64_t q6_hi_mask(int qd, int s) { return 0x0003000300030003ULL << (8 * s + 2 * qd); }
constexpr uint64_t kHiField = 0x3333;  // in a 16-bit half, the 2-bit slots 4 r (shifted by 2 z)

// Value u = 8 z + 2 r + s (z = 0..1, r = 0..3, s = 0..1) of sub-block i: its low nibble at bits 16 s + 4 r of
// column c's dword in run z, its 2 high bits at bits 16 s + 4 r + 2 z of the column's dword in the high run.
void repack_block6(const uint8_t* src, int64_t row_bytes, uint8_t* dst) {
  for (int c = 0; c < 16; ++c) {
    const uint8_t* p = src + c * row_bytes;
    std::memcpy(dst + 2 * c, p + 208, 2);
    for (int i = 0; i < 16; ++i) dst[32 + 16 * i + c] = p[192 + i];
    for (int i = 0; i < 16; ++i) {
      const int qd = (i % 8) / 2;
      uint32_t lo[2], hi = 0;
      for (int z = 0; z < 2; ++z) {
        uint64_t l8, h8;
        std::memcpy(&l8, p + q6_ql(i) + 8 * z, 8);
        std::memcpy(&h8, p + q6_qh(i) + 8 * z, 8);
        lo[z] = pack_dword(l8, qd / 2);
        for (int s = 0; s < 2; ++s)
          hi |= static_cast<uint32_t>(pdep64(pext64(h8, q6_hi_mask(qd, s)), kHiField << (2 * z))) << (16 * s);
      }
      uint8_t* q = dst + 288 + 192 * i + 4 * c;
      std::memcpy(q, &lo[0], 4);
      std::memcpy(q + 64, &lo[1], 4);
      std::memcpy(q + 128, &hi, 4);
    }
  }
}

void unpack_row6(const uint8_t* blk, int c, uint8_t* p) {  // column c of one repacked Q6_K block -> its 210 bytes
  std::memset(p, 0, 192);
  std::memcpy(p + 208, blk + 2 * c, 2);
  for (int i = 0; i < 16; ++i) p[192 + i] = blk[32 + 16 * i + c];
  for (int i = 0; i < 16; ++i) {  // sub-blocks sharing ql / qh bytes OR their bits in
    const int qd = (i % 8) / 2;
    const uint8_t* q = blk + 288 + 192 * i + 4 * c;
    uint32_t lo[2], hi;
    std::memcpy(&lo[0], q, 4);
    std::memcpy(&lo[1], q + 64, 4);
    std::memcpy(&hi, q + 128, 4);
    for (int z = 0; z < 2; ++z) {
      uint64_t l8, h8;
      std::memcpy(&l8, p + q6_ql(i) + 8 * z, 8);
      std::memcpy(&h8, p + q6_qh(i) + 8 * z, 8);
      l8 |= unpack_dword(lo[z], qd / 2);
      for (int s = 0; s < 2; ++s)
        h8 |= pdep64(pext64((hi >> (16 * s)) & 0xFFFF, kHiField << (2 * z)), q6_hi_mask(qd, s));
      std::memcpy(p + q6_ql(i) + 8 * z, &l8, 8);
      std::memcpy(p + q6_qh(i) + 8 * z, &h8, 8);
    }
  }
}

at::Tensor gguf_q6k_x16_repack(const at::Tensor& w) {
  return frugallm::x16::repack(w, "gguf_q6k_x16_repack", kQ6KFormat, repack_block6);
}

at::Tensor gguf_q6k_x16_unpack(const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& rows) {
  return frugallm::x16::unpack(w, n, rows, "gguf_q6k_x16_unpack", kQ6KFormat, unpack_row6);
}

// Sub-blocks interleaved per pass over a group: a sub-block's multiply-adds per row form two dependent chains (a0,
// a1; 16 FMAs of 4 cycles or 8 vdpbf16ps of ~6 on Zen 4), so with few rows per pass SB sub-blocks run together
// (2 SB MC chains in flight). Each sub-block keeps its own a0 / a1 and the totals take them in sub-block order: the
// arithmetic does not depend on SB (nor on MC).
template <int MC>
constexpr int kSubBlocks = MC == 1 ? 4 : MC == 2 ? 2 : 1;

#if defined(X16_AVX512)
// The 6-bit (scale, min) of sub-block j for 16 columns from the packed bytes sb[12] (the reference's
// get_scale_min_k4).
inline void scale_min_512(const __m512i* sb, int j, __m512i& sc, __m512i& mn) {
  const __m512i m63 = _mm512_set1_epi32(63), m15 = _mm512_set1_epi32(15);
  if (j < 4) {
    sc = _mm512_and_si512(sb[j], m63);
    mn = _mm512_and_si512(sb[j + 4], m63);
  } else {
    sc = _mm512_or_si512(_mm512_and_si512(sb[j + 4], m15), _mm512_slli_epi32(_mm512_srli_epi32(sb[j - 4], 6), 4));
    mn = _mm512_or_si512(_mm512_srli_epi32(sb[j + 4], 4), _mm512_slli_epi32(_mm512_srli_epi32(sb[j], 6), 4));
  }
}

// res[m][c] = sum over the row of (d sc) * sum(x q) - (dmin m) * sum(x), fp32 x rows x[m * k ...].
template <int MC>
void group_f32_512(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs32, float* res) {
  constexpr int SB = kSubBlocks<MC>;
  // vpermps reads the low 4 bits of each index lane: a code's fp32 value from its nibble after one shift.
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 t[MC], off[MC];
  for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    const __m512 dmv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
    __m512i sb[12];
    for (int i = 0; i < 12; ++i) sb[i] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 + 16 * i)));
    for (int j0 = 0; j0 < 8; j0 += SB) {
      __m512 a0[SB][MC], a1[SB][MC];
      for (int s = 0; s < SB; ++s)
        for (int m = 0; m < MC; ++m) a0[s][m] = a1[s][m] = _mm512_setzero_ps();
      for (int z = 0; z < 4; ++z) {
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 4
          for (int s = 0; s < SB; ++s) {
            const __m512i d = _mm512_loadu_si512(b + 256 + 256 * (j0 + s) + 64 * z);
            const __m512 v0 = _mm512_permutexvar_ps(r == 0 ? d : _mm512_srli_epi32(d, 4 * r), codes);
            const __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16 + 4 * r), codes);
            for (int m = 0; m < MC; ++m) {
              const float* xm = x + m * k + 256 * blk + 32 * (j0 + s) + 8 * z + 2 * r;
              a0[s][m] = _mm512_fmadd_ps(v0, _mm512_set1_ps(xm[0]), a0[s][m]);
              a1[s][m] = _mm512_fmadd_ps(v1, _mm512_set1_ps(xm[1]), a1[s][m]);
            }
          }
        }
      }
      for (int s = 0; s < SB; ++s) {
        const int j = j0 + s;
        __m512i sc, mn;
        scale_min_512(sb, j, sc, mn);
        const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
        const __m512 mnv = _mm512_mul_ps(dmv, _mm512_cvtepi32_ps(mn));
        for (int m = 0; m < MC; ++m) {
          t[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[s][m], a1[s][m]), scale, t[m]);
          off[m] = _mm512_fmadd_ps(mnv, _mm512_set1_ps(xs32[m * (k / 32) + 8 * blk + j]), off[m]);
        }
      }
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, _mm512_sub_ps(t[m], off[m]));
}
#endif

#if defined(X16_BF16)
template <int MC>
void group_bf16_512(const uint8_t* w, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs32, float* res) {
  constexpr int SB = kSubBlocks<MC>;  // sub-blocks interleaved (see group_f32_512)
  const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  __m512 t[MC], off[MC];
  for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    const __m512 dmv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
    __m512i sb[12];
    for (int i = 0; i < 12; ++i) sb[i] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 + 16 * i)));
    for (int j0 = 0; j0 < 8; j0 += SB) {
      __m512 a0[SB][MC], a1[SB][MC];
      for (int s = 0; s < SB; ++s)
        for (int m = 0; m < MC; ++m) a0[s][m] = a1[s][m] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int z = 0; z < 4; ++z) {
#pragma GCC unroll 4
        for (int s = 0; s < SB; ++s) {
          const __m512i d = _mm512_loadu_si512(b + 256 + 256 * (j0 + s) + 64 * z);
          // 0x4300 | q is bf16 128 + q (exact): the codes as bf16 in one ternary-logic op each.
          const __m512bh v0 = (__m512bh)_mm512_ternarylogic_epi32(d, nib, magic, 0xEA);
          const __m512bh v1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), nib, magic, 0xEA);
          const __m512bh v2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 8), nib, magic, 0xEA);
          const __m512bh v3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 12), nib, magic, 0xEA);
          for (int m = 0; m < MC; ++m) {
            const float* xm = reinterpret_cast<const float*>(x + m * k + 256 * blk + 32 * (j0 + s) + 8 * z);  // bf16 pairs
            a0[s][m] = _mm512_dpbf16_ps(a0[s][m], v0, (__m512bh)_mm512_set1_ps(xm[0]));
            a1[s][m] = _mm512_dpbf16_ps(a1[s][m], v1, (__m512bh)_mm512_set1_ps(xm[1]));
            a0[s][m] = _mm512_dpbf16_ps(a0[s][m], v2, (__m512bh)_mm512_set1_ps(xm[2]));
            a1[s][m] = _mm512_dpbf16_ps(a1[s][m], v3, (__m512bh)_mm512_set1_ps(xm[3]));
          }
        }
      }
      for (int s = 0; s < SB; ++s) {
        const int j = j0 + s;
        __m512i sc, mn;
        scale_min_512(sb, j, sc, mn);
        const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
        const __m512 mnv = _mm512_mul_ps(dmv, _mm512_cvtepi32_ps(mn));
        for (int m = 0; m < MC; ++m) {
          const float xs = xs32[m * (k / 32) + 8 * blk + j];
          const __m512 sxq = _mm512_sub_ps(_mm512_add_ps(a0[s][m], a1[s][m]), _mm512_set1_ps(128.0f * xs));  // sum(x q)
          t[m] = _mm512_fmadd_ps(sxq, scale, t[m]);
          off[m] = _mm512_fmadd_ps(mnv, _mm512_set1_ps(xs), off[m]);
        }
      }
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, _mm512_sub_ps(t[m], off[m]));
}
#endif

#if defined(X16_VEC) && !defined(X16_AVX512)
// AVX2: the 16 columns as two halves of 8 lanes (h: columns 8h..8h+7), same arithmetic per column as AVX-512.
template <int MC>
void group_f32_256(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs32, float* res) {
  constexpr int SB = kSubBlocks<MC> > 2 ? 2 : kSubBlocks<MC>;  // 16 ymm registers: at most 2 interleaved
  const __m256i m63 = _mm256_set1_epi32(63), m15 = _mm256_set1_epi32(15);
  for (int h = 0; h < 2; ++h) {
    __m256 t[MC], off[MC];
    for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = w + blk * kBlock;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * h)));
      const __m256 dmv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 16 * h)));
      __m256i sb[12];
      for (int i = 0; i < 12; ++i)
        sb[i] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 64 + 16 * i + 8 * h)));
      for (int j0 = 0; j0 < 8; j0 += SB) {
        __m256 a0[SB][MC], a1[SB][MC];
        for (int s = 0; s < SB; ++s)
          for (int m = 0; m < MC; ++m) a0[s][m] = a1[s][m] = _mm256_setzero_ps();
        for (int z = 0; z < 4; ++z) {
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
#pragma GCC unroll 2
            for (int s = 0; s < SB; ++s) {
              const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 256 + 256 * (j0 + s) + 32 * h + 64 * z));
              const __m256 v0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 4 * r), m15));
              const __m256 v1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 16 + 4 * r), m15));
              for (int m = 0; m < MC; ++m) {
                const float* xm = x + m * k + 256 * blk + 32 * (j0 + s) + 8 * z + 2 * r;
                a0[s][m] = _mm256_fmadd_ps(v0, _mm256_set1_ps(xm[0]), a0[s][m]);
                a1[s][m] = _mm256_fmadd_ps(v1, _mm256_set1_ps(xm[1]), a1[s][m]);
              }
            }
          }
        }
        for (int s = 0; s < SB; ++s) {
          const int j = j0 + s;
          __m256i sc, mn;
          if (j < 4) {
            sc = _mm256_and_si256(sb[j], m63);
            mn = _mm256_and_si256(sb[j + 4], m63);
          } else {
            sc = _mm256_or_si256(_mm256_and_si256(sb[j + 4], m15), _mm256_slli_epi32(_mm256_srli_epi32(sb[j - 4], 6), 4));
            mn = _mm256_or_si256(_mm256_srli_epi32(sb[j + 4], 4), _mm256_slli_epi32(_mm256_srli_epi32(sb[j], 6), 4));
          }
          const __m256 scale = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(sc));
          const __m256 mnv = _mm256_mul_ps(dmv, _mm256_cvtepi32_ps(mn));
          for (int m = 0; m < MC; ++m) {
            t[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[s][m], a1[s][m]), scale, t[m]);
            off[m] = _mm256_fmadd_ps(mnv, _mm256_set1_ps(xs32[m * (k / 32) + 8 * blk + j]), off[m]);
          }
        }
      }
    }
    for (int m = 0; m < MC; ++m) _mm256_storeu_ps(res + 16 * m + 8 * h, _mm256_sub_ps(t[m], off[m]));
  }
}
#endif

// Q6_K kernels: res[m][c] = sum over sub-blocks i of (d sc_i) * (sum(x q) - 32 sum(x)), xs16 the per-16 sums of x.
#if defined(X16_AVX512)
// The 2 bits at bit b of each lane moved to bits 4..5 (b = 16 s + 4 r + 2 z: value (z, r, s)'s high bits).
inline __m512i hi_at4_512(__m512i hi, int b) {
  return b >= 4 ? _mm512_srli_epi32(hi, b - 4) : _mm512_slli_epi32(hi, 4 - b);
}

// Value (z, r, s)'s 6-bit codes as int32 lanes: bits 0..3 from the low nibbles, 4..5 from the high bits
// (0xE4: C ? A : B).
inline __m512i q6k_code_512(__m512i lo, __m512i hi, int z, int r, int s, __m512i m15, __m512i m63) {
  return _mm512_and_si512(
      _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 16 * s + 4 * r), hi_at4_512(hi, 16 * s + 4 * r + 2 * z), m15,
                                0xE4),
      m63);
}

template <int MC>
void group6_f32_512(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs16, float* res) {
  const __m512i m15 = _mm512_set1_epi32(15), m63 = _mm512_set1_epi32(63);
  __m512 t[MC];
  for (int m = 0; m < MC; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock6;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    for (int i = 0; i < 16; ++i) {
      const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 16 * i)));
      const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
      const uint8_t* q = b + 288 + 192 * i;
      const __m512i hi = _mm512_loadu_si512(q + 128);
      __m512 a0[MC], a1[MC];
      for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
      for (int z = 0; z < 2; ++z) {
        const __m512i lo = _mm512_loadu_si512(q + 64 * z);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m512i c0 = q6k_code_512(lo, hi, z, r, 0, m15, m63), c1 = q6k_code_512(lo, hi, z, r, 1, m15, m63);
          const __m512 v0 = _mm512_cvtepi32_ps(c0), v1 = _mm512_cvtepi32_ps(c1);
          for (int m = 0; m < MC; ++m) {
            const float* xm = x + m * k + 256 * blk + 16 * i + 8 * z + 2 * r;
            a0[m] = _mm512_fmadd_ps(v0, _mm512_set1_ps(xm[0]), a0[m]);
            a1[m] = _mm512_fmadd_ps(v1, _mm512_set1_ps(xm[1]), a1[m]);
          }
        }
      }
      for (int m = 0; m < MC; ++m) {
        const __m512 off = _mm512_set1_ps(32.0f * xs16[m * (k / 16) + 16 * blk + i]);
        t[m] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_add_ps(a0[m], a1[m]), off), scale, t[m]);
      }
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, t[m]);
}
#endif

#if defined(X16_BF16)
template <int MC>
void group6_bf16_512(const uint8_t* w, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs16,
                     float* res) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), code = _mm512_set1_epi32(0x003F003F),
                magic = _mm512_set1_epi32(0x43004300);
  __m512 t[MC];
  for (int m = 0; m < MC; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock6;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    for (int i = 0; i < 16; ++i) {
      const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 16 * i)));
      const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
      const uint8_t* q = b + 288 + 192 * i;
      const __m512i hi = _mm512_loadu_si512(q + 128);
      __m512 a0[MC], a1[MC];
      for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
      for (int z = 0; z < 2; ++z) {
        const __m512i lo = _mm512_loadu_si512(q + 64 * z);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          // both halves at once: 0x4300 | code is bf16 128 + code (exact for codes < 128)
          const __m512i sel = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 4 * r), hi_at4_512(hi, 4 * r + 2 * z),
                                                        nib, 0xE4);
          const __m512bh v = (__m512bh)_mm512_ternarylogic_epi32(sel, code, magic, 0xEA);
          for (int m = 0; m < MC; ++m) {
            const float* xm = reinterpret_cast<const float*>(x + m * k + 256 * blk + 16 * i + 8 * z + 2 * r);
            if (r % 2 == 0) {
              a0[m] = _mm512_dpbf16_ps(a0[m], v, (__m512bh)_mm512_set1_ps(xm[0]));
            } else {
              a1[m] = _mm512_dpbf16_ps(a1[m], v, (__m512bh)_mm512_set1_ps(xm[0]));
            }
          }
        }
      }
      for (int m = 0; m < MC; ++m) {  // sum(x (128 + q)) - 160 sum(x) = sum(x (q - 32))
        const __m512 off = _mm512_set1_ps(160.0f * xs16[m * (k / 16) + 16 * blk + i]);
        t[m] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_add_ps(a0[m], a1[m]), off), scale, t[m]);
      }
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, t[m]);
}
#endif

#if defined(X16_VEC) && !defined(X16_AVX512)
inline __m256i hi_at4_256(__m256i hi, int b) {
  return b >= 4 ? _mm256_srli_epi32(hi, b - 4) : _mm256_slli_epi32(hi, 4 - b);
}

template <int MC>
void group6_f32_256(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs16, float* res) {
  const __m256i m15 = _mm256_set1_epi32(15), m48 = _mm256_set1_epi32(48);
  for (int h = 0; h < 2; ++h) {
    __m256 t[MC];
    for (int m = 0; m < MC; ++m) t[m] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = w + blk * kBlock6;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * h)));
      for (int i = 0; i < 16; ++i) {
        const __m256i sc =
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 32 + 16 * i + 8 * h)));
        const __m256 scale = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(sc));
        const uint8_t* q = b + 288 + 192 * i + 32 * h;
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 128));
        __m256 a0[MC], a1[MC];
        for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
        for (int z = 0; z < 2; ++z) {
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * z));
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {
            const __m256 v0 = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo, 4 * r), m15),
                                                                 _mm256_and_si256(hi_at4_256(hi, 4 * r + 2 * z), m48)));
            const __m256 v1 = _mm256_cvtepi32_ps(
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo, 16 + 4 * r), m15),
                                _mm256_and_si256(hi_at4_256(hi, 16 + 4 * r + 2 * z), m48)));
            for (int m = 0; m < MC; ++m) {
              const float* xm = x + m * k + 256 * blk + 16 * i + 8 * z + 2 * r;
              a0[m] = _mm256_fmadd_ps(v0, _mm256_set1_ps(xm[0]), a0[m]);
              a1[m] = _mm256_fmadd_ps(v1, _mm256_set1_ps(xm[1]), a1[m]);
            }
          }
        }
        for (int m = 0; m < MC; ++m) {
          const __m256 off = _mm256_set1_ps(32.0f * xs16[m * (k / 16) + 16 * blk + i]);
          t[m] = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_add_ps(a0[m], a1[m]), off), scale, t[m]);
        }
      }
    }
    for (int m = 0; m < MC; ++m) _mm256_storeu_ps(res + 16 * m + 8 * h, t[m]);
  }
}
#endif

#if defined(X16_AVX512)
// Wide passes (Q6_K, 5..kRowsWide rows, AVX-512): a sub-block's codes are decoded once into buf (L1: 16 vectors) and
// rows run against it in chunks of up to 8 (16 accumulator chains in flight), so a pass of r rows decodes the codes
// once instead of ceil(r / 4) times. Each row's arithmetic is the one-row kernel's: per sub-block, chain a0 over its
// even-indexed products and a1 over its odd ones, in the same order from zero, then a0 + a1 meets the scale in
// sub-block order (only the order of independent rows changes): bit-identical to a one-row pass. Q6_K fp32 against
// the 4-row build (gguf_rows.py --compare-src, interleaved pairs, 1 thread, loaded machine; 2048x1536, 8960x1536):
// 9 rows 1.10x, 12-16 rows 1.14-1.16x, one row unchanged; bf16 (min of 40 against 4-row calls) up to 1.13x. Q4_K
// gains nothing from it (fp32 0.80-0.88x, bf16 0.94-1.00x): its decode (one shift and one vpermps per 16 products)
// already hides under the FMAs of a 4-row pass, which run at about one zmm FMA per cycle (r rows cost about r times
// the FMAs: the floor of this exact arithmetic).
constexpr int kChunk = 8;

// s[m] = a0 + a1 of row m (x + m * k: the sub-block's first value) over NP products: buf[p] times x value p (fp32)
// or bf16 pair p (BF16) into chain p % 2.
template <int CH, int NP, bool BF16, typename XT>
inline void chunk_512(const __m512* buf, const XT* x, int64_t k, __m512* s) {
  __m512 a0[CH], a1[CH];
  for (int m = 0; m < CH; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int p = 0; p < NP; p += 2) {
    __m512 v0 = buf[p], v1 = buf[p + 1];
    // In registers: otherwise GCC folds buf's loads into each FMA and the x broadcasts become separate uops.
    asm("" : "+v"(v0), "+v"(v1));
    for (int m = 0; m < CH; ++m) {
      const float* xm = reinterpret_cast<const float*>(x + m * k);  // fp32 values or bf16 pairs
#if defined(X16_BF16)
      if constexpr (BF16) {
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)v0, (__m512bh)_mm512_set1_ps(xm[p]));
        a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)v1, (__m512bh)_mm512_set1_ps(xm[p + 1]));
        continue;
      }
#endif
      a0[m] = _mm512_fmadd_ps(v0, _mm512_set1_ps(xm[p]), a0[m]);
      a1[m] = _mm512_fmadd_ps(v1, _mm512_set1_ps(xm[p + 1]), a1[m]);
    }
  }
  for (int m = 0; m < CH; ++m) s[m] = _mm512_add_ps(a0[m], a1[m]);
}

template <int NP, bool BF16, typename XT>
inline void rows_512(const __m512* buf, const XT* x, int64_t k, int mc, __m512* s) {
  for (int m0 = 0; m0 < mc; m0 += kChunk) {
    const XT* xm = x + m0 * k;
    switch (std::min(kChunk, mc - m0)) {
      case 1: chunk_512<1, NP, BF16>(buf, xm, k, s + m0); break;
      case 2: chunk_512<2, NP, BF16>(buf, xm, k, s + m0); break;
      case 3: chunk_512<3, NP, BF16>(buf, xm, k, s + m0); break;
      case 4: chunk_512<4, NP, BF16>(buf, xm, k, s + m0); break;
      case 5: chunk_512<5, NP, BF16>(buf, xm, k, s + m0); break;
      case 6: chunk_512<6, NP, BF16>(buf, xm, k, s + m0); break;
      case 7: chunk_512<7, NP, BF16>(buf, xm, k, s + m0); break;
      default: chunk_512<8, NP, BF16>(buf, xm, k, s + m0); break;
    }
  }
}

// Q6_K, mc rows: the per-row arithmetic of group6_f32_512 / group6_bf16_512.
template <bool BF16, typename XT>
void group6_wide_512(const uint8_t* w, int64_t nblocks, const XT* x, int64_t k, const float* xs16, int mc,
                     float* res) {
  const __m512i m15 = _mm512_set1_epi32(15), m63 = _mm512_set1_epi32(63);
  const __m512i nib = _mm512_set1_epi32(0x000F000F), code = _mm512_set1_epi32(0x003F003F),
                magic = _mm512_set1_epi32(0x43004300);
  __m512 buf[16], s[kRowsWide], t[kRowsWide];
  for (int m = 0; m < mc; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock6;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    for (int i = 0; i < 16; ++i) {
      const uint8_t* q = b + 288 + 192 * i;
      const __m512i hi = _mm512_loadu_si512(q + 128);
      for (int z = 0; z < 2; ++z) {
        const __m512i lo = _mm512_loadu_si512(q + 64 * z);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          if constexpr (BF16) {  // product p = 4 z + r: bf16 pair r of run z
            const __m512i sel = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 4 * r), hi_at4_512(hi, 4 * r + 2 * z),
                                                          nib, 0xE4);
            buf[4 * z + r] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sel, code, magic, 0xEA));
          } else {  // product p = 8 z + 2 r + s: value 8 z + 2 r + s
            const __m512i c0 = q6k_code_512(lo, hi, z, r, 0, m15, m63), c1 = q6k_code_512(lo, hi, z, r, 1, m15, m63);
            buf[8 * z + 2 * r] = _mm512_cvtepi32_ps(c0);
            buf[8 * z + 2 * r + 1] = _mm512_cvtepi32_ps(c1);
          }
        }
      }
      rows_512<BF16 ? 8 : 16, BF16>(buf, x + 256 * blk + 16 * i, k, mc, s);
      const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 16 * i)));
      const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
      for (int m = 0; m < mc; ++m) {
        const __m512 off = _mm512_set1_ps((BF16 ? 160.0f : 32.0f) * xs16[m * (k / 16) + 16 * blk + i]);
        t[m] = _mm512_fmadd_ps(_mm512_sub_ps(s[m], off), scale, t[m]);
      }
    }
  }
  for (int m = 0; m < mc; ++m) _mm512_storeu_ps(res + 16 * m, t[m]);
}
#endif

// Per row and G-value sub-block (32: Q4_K, 16: Q6_K), sum(x) in fp32 (a fixed order per row: independent of the
// pass).
template <typename T>
std::vector<float> sub_sums(const T* x, int64_t rows, int64_t k, int64_t g) {
  std::vector<float> xs(rows * (k / g));
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < k / g; ++j) {
      float s = 0.0f;
      for (int64_t i = 0; i < g; ++i) s += frugallm::to_float(x[m * k + g * j + i]);
      xs[m * (k / g) + j] = s;
    }
  return xs;
}

// Runs group(mc, w_g, nblocks, x rows, k, xs, res[mc][16]) over groups x row passes; stores res + bias as OutT.
// `wide`: group takes passes of up to kRowsWide rows (Q6_K), else of up to kRowsPass.
template <typename XT, typename OutT, typename Group>
void run_groups(const uint8_t* w, int64_t n, int64_t nblocks, int64_t block_bytes, const XT* x, int64_t rows,
                int64_t k, const float* xs, int64_t xs_row, const float* bias, OutT* y, bool wide, Group&& group) {
  const int64_t pass = wide && rows >= kWideFrom ? kRowsWide : kRowsPass;
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    float res[kRowsWide * 16];
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += pass) {
        const int64_t mc = std::min<int64_t>(pass, rows - m0);
        group(static_cast<int>(mc), w + g * nblocks * block_bytes, nblocks, x + m0 * k, k, xs + m0 * xs_row, res);
        for (int64_t m = 0; m < mc; ++m)
          for (int c = 0; c < 16; ++c) {
            const float v = res[16 * m + c] + (bias ? bias[16 * g + c] : 0.0f);
            if constexpr (std::is_same_v<OutT, float>) {
              y[(m0 + m) * n + 16 * g + c] = v;
            } else {
              y[(m0 + m) * n + 16 * g + c] = frugallm::float_to_bf16(v);
            }
          }
      }
  });
}

// The MC = 1..4 instantiations of a group kernel: K (a template) picks it by mc at run time; WIDE runs passes of
// kWideFrom rows or more (group6_wide_512; (void)0 where run_groups never passes more than kRowsPass rows).
#define X16_DISPATCH(NAME, KERNEL, XT, WIDE)                                                             \
  void NAME(int mc, const uint8_t* w, int64_t nblocks, const XT* x, int64_t k, const float* xs, float* res) { \
    if (mc >= kWideFrom) {                                                                                \
      WIDE;                                                                                               \
      return;                                                                                             \
    }                                                                                                     \
    switch (mc) {                                                                                         \
      case 1: KERNEL<1>(w, nblocks, x, k, xs, res); break;                                               \
      case 2: KERNEL<2>(w, nblocks, x, k, xs, res); break;                                               \
      case 3: KERNEL<3>(w, nblocks, x, k, xs, res); break;                                               \
      default: KERNEL<4>(w, nblocks, x, k, xs, res); break;                                              \
    }                                                                                                     \
  }
#if defined(X16_AVX512)
X16_DISPATCH(group_f32, group_f32_512, float, (void)0)
X16_DISPATCH(group6_f32, group6_f32_512, float, (group6_wide_512<false>(w, nblocks, x, k, xs, mc, res)))
#elif defined(X16_VEC)
X16_DISPATCH(group_f32, group_f32_256, float, (void)0)
X16_DISPATCH(group6_f32, group6_f32_256, float, (void)0)
#endif
#if defined(X16_BF16)
X16_DISPATCH(group_bf16, group_bf16_512, uint16_t, (void)0)
X16_DISPATCH(group6_bf16, group6_bf16_512, uint16_t, (group6_wide_512<true>(w, nblocks, x, k, xs, mc, res)))
#endif
#undef X16_DISPATCH

// Q4_K (12) or Q6_K (14) repacked; `op` names the caller in errors.
at::Tensor x16_linear(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(kVectorized, op, ": this build has no vector path (needs AVX2 + FMA + F16C)");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x must be a CPU float32 or bfloat16 [rows, K] tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1);
  TORCH_CHECK(k > 0 && k % 256 == 0, op, ": in_features ", k, " is not a multiple of 256");
  const int64_t nblocks = k / 256;
  const bool q6 = qtype == kQ6K;
  const int64_t block_bytes = q6 ? kBlock6 : kBlock, g = q6 ? 16 : 32;
  frugallm::x16::check_weight(op, w, n, nblocks, q6 ? kQ6KFormat : kQ4KFormat);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, op, ": bias must be float32 [", n, "]");
    b = bias->contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({rows, n}, xc.options());
  if (rows == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
#if defined(X16_VEC)
  if (xc.scalar_type() == at::kFloat) {
    const float* xp = xc.data_ptr<float>();
    const std::vector<float> xs = sub_sums(xp, rows, k, g);
    run_groups(wp, n, nblocks, block_bytes, xp, rows, k, xs.data(), k / g, bp, y.data_ptr<float>(), q6,
               q6 ? group6_f32 : group_f32);
    return y;
  }
  const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const std::vector<float> xs = sub_sums(xc.data_ptr<at::BFloat16>(), rows, k, g);
#if defined(X16_BF16)
  run_groups(wp, n, nblocks, block_bytes, xb, rows, k, xs.data(), k / g, bp, yb, q6, q6 ? group6_bf16 : group_bf16);
#else
  std::vector<float> xf(rows * k);  // no bf16 dot products here: widen x (exact) and run the fp32 path
  for (int64_t i = 0; i < rows * k; ++i) xf[i] = frugallm::bf16_to_float(xb[i]);
  run_groups(wp, n, nblocks, block_bytes, xf.data(), rows, k, xs.data(), k / g, bp, yb, q6,
             q6 ? group6_f32 : group_f32);
#endif
#endif
  return y;
}

at::Tensor gguf_q4k_x16_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qtype == kQ4K, "gguf_q4k_x16_linear: only Q4_K (12) is repacked, got qtype ", qtype);
  return x16_linear("gguf_q4k_x16_linear", x, w, qtype, n, bias);
}

at::Tensor gguf_x16_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qtype == kQ4K || qtype == kQ6K, "gguf_x16_linear: only Q4_K (12) and Q6_K (14) are repacked, got qtype ",
              qtype);
  return x16_linear("gguf_x16_linear", x, w, qtype, n, bias);
}

// ---- int8 activations (weights="stored-q8": llama.cpp's arithmetic, NOT exact) ------------------------------------
// x quantized per 32 values exactly as csrc/gguf_q8.cpp does (csrc/gguf_q8_act.h: the same codes qx and scales dx).
// A repacked dword's bytes, masked to their low nibbles, are the codes of values 8 z + {0, 4, 1, 5} of its run, and
// shifted right by 4 those of 8 z + {2, 6, 3, 7}: with qx permuted once per call to that order per 8 values, one
// broadcast dword of 4 codes meets 16 columns' 4 codes in one vpdpbusd (64 multiply-adds, no horizontal sums).
// Per 32 values (Q4_K) / 16 (Q6_K) the integer dot per column is exact; it meets (d sc) dx in one fp32 FMA and the
// offset (Q4_K: dmin mn per 32, Q6_K: 32 d sc per 16) times dx * sum(qx) is subtracted by one more, so the result is gguf_linear_q8's up to
// fp32 rounding (its sums run in another order) and every row's arithmetic is the same at any rows per pass.
#if defined(X16_VEC)
// Rows per pass: a verify pass of up to this many rows decodes the codes once. Against the 8-row build (gguf_rows.py
// --compare-src, interleaved pairs, 1 thread, loaded machine; 2048x1536 and 8960x1536) at 9-16 rows: Q4_K
// 0.99-1.06x, Q6_K 1.04-1.09x; one row unchanged. AVX2's 16 registers: 8.
#if defined(X16_AVX512)
constexpr int64_t kRowsPassQ8 = 16;
#else
constexpr int64_t kRowsPassQ8 = 8;
#endif

// The vector width's operations (AVX-512: the 16 columns in one vector; AVX2: two halves of 8, h = 0, 1).
#if defined(X16_AVX512)
struct VecQ8 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  template <int S> static I srli(I a) { return S == 0 ? a : _mm512_srli_epi32(a, S); }
  template <int S> static I slli(I a) { return S == 0 ? a : _mm512_slli_epi32(a, S); }
  static I bcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
  static I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static I zeroi() { return _mm512_setzero_si512(); }
  static I dot4(I acc, I u, I s) {  // acc + per lane the 4 byte products u (unsigned) . s (signed)
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
  }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F set1f(float v) { return _mm512_set1_ps(v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct VecQ8 {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  template <int S> static I srli(I a) { return S == 0 ? a : _mm256_srli_epi32(a, S); }
  template <int S> static I slli(I a) { return S == 0 ? a : _mm256_slli_epi32(a, S); }
  static I bcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static I zeroi() { return _mm256_setzero_si256(); }
  static I dot4(I acc, I u, I s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
  }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F set1f(float v) { return _mm256_set1_ps(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F half(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

// The build's -fassociative-math lets the compiler regroup sums and products; an instantiation with few rows did
// (one-row outputs then differed from the same row's in a pass of several): an empty asm pins a value as computed.
template <typename F>
inline void in_order(F& v) {
  asm("" : "+v"(v));
}

// Which integer dot product the int8 path of this build uses (tests and benchmarks report it).
const char* x16_q8_isa() {
#if defined(X16_AVX512) && defined(__AVX512VNNI__)
  return "avx512vnni";
#elif defined(X16_AVX512)
  return "avx512bw";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVXVNNI__)
  return "avxvnni";
#else
  return "avx2";
#endif
}

// Q4_K, MC rows: res[m][c] = sum_j (d sc_j) dx_j (u . qx)_j - (dmin mn_j) (dx sum qx)_j. qx: [rows, k] codes in the
// permuted order, dx / s32: [rows, k / 32] scales and dx * sums.
template <int MC>
void group_q8_q4k(const uint8_t* w, int64_t nblocks, const int8_t* qx, int64_t k, const float* dx, const float* s32,
                  float* res) {
  using V = VecQ8;
  const int64_t nc = k / 32;
  const typename V::I m4 = V::set1i(0x0F0F0F0F), m63 = V::set1i(63), m15 = V::set1i(15);
  for (int h = 0; h < 16 / V::W; ++h) {
    typename V::F t[MC];  // the offsets too (fnmadd): one register per row
    for (int m = 0; m < MC; ++m) t[m] = V::zerof();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = w + blk * kBlock;
      const typename V::F dv = V::half(b + 2 * V::W * h), dmv = V::half(b + 32 + 2 * V::W * h);
      typename V::I sb[12];
      for (int i = 0; i < 12; ++i) sb[i] = V::u8(b + 64 + 16 * i + V::W * h);
      for (int j = 0; j < 8; ++j) {
        typename V::I sc, mn;
        if (j < 4) {
          sc = V::and_(sb[j], m63);
          mn = V::and_(sb[j + 4], m63);
        } else {
          sc = V::or_(V::and_(sb[j + 4], m15), V::template slli<4>(V::template srli<6>(sb[j - 4])));
          mn = V::or_(V::template srli<4>(sb[j + 4]), V::template slli<4>(V::template srli<6>(sb[j])));
        }
        typename V::F scale = V::mul(dv, V::cvt(sc)), mnv = V::mul(dmv, V::cvt(mn));
        in_order(scale);
        in_order(mnv);
        const auto update = [&](int m, typename V::I p) {
          const int64_t c = m * nc + 8 * blk + j;
          typename V::F sdx = V::mul(scale, V::set1f(dx[c]));
          in_order(sdx);
          t[m] = V::fnmadd(mnv, V::set1f(s32[c]), V::fmadd(V::cvt(p), sdx, t[m]));
          in_order(t[m]);
        };
        if constexpr (MC > 8) {
          // More rows than accumulator pairs fit (AVX-512 passes of 9-16): the sub-block's codes decoded first (8
          // registers), then each row's dot products as two short chains of temporaries (integer: the same sums).
          typename V::I u0[4], u1[4];
          for (int z = 0; z < 4; ++z) {
            const typename V::I d = V::load(b + 256 + 256 * j + 64 * z + 4 * V::W * h);
            u0[z] = V::and_(d, m4);
            u1[z] = V::and_(V::template srli<4>(d), m4);
          }
          for (int m = 0; m < MC; ++m) {
            const int8_t* xm = qx + m * k + 256 * blk + 32 * j;
            typename V::I p0 = V::dot4(V::zeroi(), u0[0], V::bcast(xm));
            typename V::I p1 = V::dot4(V::zeroi(), u1[0], V::bcast(xm + 4));
            for (int z = 1; z < 4; ++z) {
              p0 = V::dot4(p0, u0[z], V::bcast(xm + 8 * z));
              p1 = V::dot4(p1, u1[z], V::bcast(xm + 8 * z + 4));
            }
            update(m, V::add_i(p0, p1));
          }
          continue;
        }
        // Two integer chains per row where registers allow (exact: the split does not change the sum).
        constexpr bool two = V::W == 16 || MC <= 2;
        typename V::I p0[MC], p1s[MC];
        typename V::I* p1 = two ? p1s : p0;
        for (int m = 0; m < MC; ++m) p0[m] = p1s[m] = V::zeroi();
#pragma GCC unroll 4
        for (int z = 0; z < 4; ++z) {
          const typename V::I d = V::load(b + 256 + 256 * j + 64 * z + 4 * V::W * h);
          const typename V::I u0 = V::and_(d, m4), u1 = V::and_(V::template srli<4>(d), m4);
          for (int m = 0; m < MC; ++m) {
            const int8_t* xm = qx + m * k + 256 * blk + 32 * j + 8 * z;
            p0[m] = V::dot4(p0[m], u0, V::bcast(xm));
            p1[m] = V::dot4(p1[m], u1, V::bcast(xm + 4));
          }
        }
        for (int m = 0; m < MC; ++m) update(m, two ? V::add_i(p0[m], p1s[m]) : p0[m]);
      }
    }
    for (int m = 0; m < MC; ++m) V::store(res + 16 * m + V::W * h, t[m]);
  }
}

// Q6_K, MC rows: res[m][c] = sum_i (d sc_i) dx (u . qx)_i - 32 (d sc_i) (dx sum qx)_i per 16 values; s16: [rows,
// k / 16] dx * sums. A code's 2 high bits (bits 16 s + 4 r + 2 z of the high run) move to bits 4..5 of its byte by
// one shift per run and parity.
template <int MC>
void group_q8_q6k(const uint8_t* w, int64_t nblocks, const int8_t* qx, int64_t k, const float* dx, const float* s16,
                  float* res) {
  using V = VecQ8;
  const int64_t nc = k / 32;
  const typename V::I m4 = V::set1i(0x0F0F0F0F), m30 = V::set1i(0x30303030);
  for (int h = 0; h < 16 / V::W; ++h) {
    typename V::F t[MC];
    for (int m = 0; m < MC; ++m) t[m] = V::zerof();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = w + blk * kBlock6;
      const typename V::F dv = V::half(b + 2 * V::W * h);
#pragma GCC unroll 2
      for (int i = 0; i < 16; ++i) {
        const uint8_t* q = b + 288 + 192 * i + 4 * V::W * h;
        const typename V::I hi = V::load(q + 128), lo0 = V::load(q), lo1 = V::load(q + 64);
        // run z, even fields (r = 0, 2): high bits at 2 z -> 4; odd fields (r = 1, 3): at 4 + 2 z -> 4
        const typename V::I u00 = V::or_(V::and_(lo0, m4), V::and_(V::template slli<4>(hi), m30));
        const typename V::I u01 = V::or_(V::and_(V::template srli<4>(lo0), m4), V::and_(hi, m30));
        const typename V::I u10 = V::or_(V::and_(lo1, m4), V::and_(V::template slli<2>(hi), m30));
        const typename V::I u11 = V::or_(V::and_(V::template srli<4>(lo1), m4), V::and_(V::template srli<2>(hi), m30));
        typename V::F scale = V::mul(dv, V::cvt(V::s8(b + 32 + 16 * i + V::W * h)));
        in_order(scale);
        const typename V::F off_scale = V::mul(V::set1f(32.0f), scale);
        for (int m = 0; m < MC; ++m) {
          const int8_t* xm = qx + m * k + 256 * blk + 16 * i;
          typename V::I p0 = V::dot4(V::zeroi(), u00, V::bcast(xm));
          typename V::I p1 = V::dot4(V::zeroi(), u01, V::bcast(xm + 4));
          p0 = V::dot4(p0, u10, V::bcast(xm + 8));
          p1 = V::dot4(p1, u11, V::bcast(xm + 12));
          typename V::F sdx = V::mul(scale, V::set1f(dx[m * nc + 8 * blk + i / 2]));
          in_order(sdx);
          t[m] = V::fnmadd(off_scale, V::set1f(s16[m * 2 * nc + 16 * blk + i]), V::fmadd(V::cvt(V::add_i(p0, p1)), sdx, t[m]));
          in_order(t[m]);
        }
      }
    }
    for (int m = 0; m < MC; ++m) V::store(res + 16 * m + V::W * h, t[m]);
  }
}

using GroupQ8 = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const float*, const float*, float*);

#if defined(X16_AVX512)
#define X16_Q8_TABLE(KERNEL)                                                                                \
  {&KERNEL<1>, &KERNEL<2>, &KERNEL<3>, &KERNEL<4>, &KERNEL<5>, &KERNEL<6>, &KERNEL<7>, &KERNEL<8>, &KERNEL<9>,   \
   &KERNEL<10>, &KERNEL<11>, &KERNEL<12>, &KERNEL<13>, &KERNEL<14>, &KERNEL<15>, &KERNEL<16>}
#else
#define X16_Q8_TABLE(KERNEL) \
  {&KERNEL<1>, &KERNEL<2>, &KERNEL<3>, &KERNEL<4>, &KERNEL<5>, &KERNEL<6>, &KERNEL<7>, &KERNEL<8>}
#endif
constexpr GroupQ8 kGroupQ4K[kRowsPassQ8] = X16_Q8_TABLE(group_q8_q4k);
constexpr GroupQ8 kGroupQ6K[kRowsPassQ8] = X16_Q8_TABLE(group_q8_q6k);
#undef X16_Q8_TABLE
#endif  // X16_VEC

at::Tensor gguf_x16_linear_q8(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                              const std::optional<at::Tensor>& bias) {
  const char* op = "gguf_x16_linear_q8";
  TORCH_CHECK(qtype == kQ4K || qtype == kQ6K, op, ": only Q4_K (12) and Q6_K (14) are repacked, got qtype ", qtype);
  TORCH_CHECK(kVectorized, op, ": this build has no vector path (needs AVX2 + FMA + F16C)");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x must be a CPU float32 or bfloat16 [rows, K] tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), k = xc.size(1);
  TORCH_CHECK(k > 0 && k % 256 == 0, op, ": in_features ", k, " is not a multiple of 256");
  const int64_t nblocks = k / 256;
  const bool q6 = qtype == kQ6K;
  frugallm::x16::check_weight(op, w, n, nblocks, q6 ? kQ6KFormat : kQ4KFormat);
  const float* bp = frugallm::bias_ptr(bias, n);
  at::Tensor y = at::empty({rows, n}, xc.options());
  if (rows == 0) return y;
#if defined(X16_VEC)
  frugallm::q8act::QuantizedX xq = frugallm::q8act::quantize_x(xc);
  for (int64_t i = 0; i < rows * k; i += 8) {  // per 8 values: the order 0 4 1 5 2 6 3 7 (see above)
    int8_t v[8];
    std::memcpy(v, xq.q.data() + i, 8);
    for (int r = 0; r < 4; ++r) {
      xq.q[i + 2 * r] = v[r];
      xq.q[i + 2 * r + 1] = v[r + 4];
    }
  }
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  auto* yb = bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t block_bytes = q6 ? kBlock6 : kBlock, nc = k / 32;
  const GroupQ8* table = q6 ? kGroupQ6K : kGroupQ4K;
  const float* sums = q6 ? xq.s16.data() : xq.s32.data();
  const int64_t sums_row = q6 ? 2 * nc : nc;
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    float res[kRowsPassQ8 * 16];
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += kRowsPassQ8) {
        const int64_t mc = std::min<int64_t>(kRowsPassQ8, rows - m0);
        table[mc - 1](wp + g * nblocks * block_bytes, nblocks, xq.q.data() + m0 * k, k, xq.d.data() + m0 * nc,
                      sums + m0 * sums_row, res);
        for (int64_t m = 0; m < mc; ++m)
          for (int c = 0; c < 16; ++c) {
            const float v = res[16 * m + c] + (bp ? bp[16 * g + c] : 0.0f);
            if (bf16)
              yb[(m0 + m) * n + 16 * g + c] = frugallm::float_to_bf16(v);
            else
              yf[(m0 + m) * n + 16 * g + c] = v;
          }
      }
  });
#else
  (void)bp;
#endif
  return y;
}

std::string gguf_x16_q8_isa() {
#if defined(X16_VEC)
  return x16_q8_isa();
#else
  return "none";
#endif
}

bool gguf_x16_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("gguf_q4k_x16_repack(Tensor w) -> Tensor");
  m.def("gguf_q4k_x16_unpack(Tensor w, int out_features, Tensor? rows) -> Tensor");
  m.def("gguf_q4k_x16_linear(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_q6k_x16_repack(Tensor w) -> Tensor");
  m.def("gguf_q6k_x16_unpack(Tensor w, int out_features, Tensor? rows) -> Tensor");
  m.def("gguf_x16_linear(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_x16_vectorized() -> bool", &gguf_x16_vectorized);
  m.def("gguf_x16_linear_q8(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_x16_q8_isa() -> str", &gguf_x16_q8_isa);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("gguf_q4k_x16_repack", &gguf_q4k_x16_repack);
  m.impl("gguf_q4k_x16_unpack", &gguf_q4k_x16_unpack);
  m.impl("gguf_q4k_x16_linear", &gguf_q4k_x16_linear);
  m.impl("gguf_q6k_x16_repack", &gguf_q6k_x16_repack);
  m.impl("gguf_q6k_x16_unpack", &gguf_q6k_x16_unpack);
  m.impl("gguf_x16_linear", &gguf_x16_linear);
  m.impl("gguf_x16_linear_q8", &gguf_x16_linear_q8);
}
