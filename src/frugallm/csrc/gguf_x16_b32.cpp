// requires: avx2 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// The 32-value GGUF block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 repacked at load with 16 weight rows interleaved,
// the way csrc/gguf_x16.cpp does Q4_K and Q6_K: a vector lane is one output column (no horizontal sums), the scale
// FMA is once per 32 values for 16 columns, an x value (or bf16 pair) is one broadcast shared by the 16 columns, and
// a decoded weight vector is shared by every input row of a pass. An output's arithmetic does not depend on how many
// rows run together or on the thread count: a verify pass is bit-identical to one-row decode. The layout holds
// exactly the file's bytes per row per block (16 * 18, 20, 22, 24, 34), so repacking costs no memory.
//
// Layout, per group of 16 weight rows (columns c), per 32-value block:
//   Q4_0 / Q4_1: d[16] fp16 | (Q4_1) m[16] fp16 | runs z = 0..3 of 64 bytes: column c's dword in run z holds, in
//   16-bit half s, field r (bits 4r..4r+3), the 4-bit code of value 8 z + 2 r + s (the order of x16b's sub-blocks).
//   Q5_0 / Q5_1: d[16] fp16 | (Q5_1) m[16] fp16 | the 5th code bits, column c's dword holding value 8 z + 2 r + s's
//   at bit 16 s + 4 r + z | the low nibbles as Q4_0's runs.
//   Q8_0: d[16] fp16 | the 32 int8 codes as [32][16] (value v of column c at byte 16 v + c).
//
//   gguf_x16_b32_repack(w uint8 [N, K / 32 * S], qtype) -> uint8 [N / 16, K / 32 * 16 S]        (N % 16 == 0)
//   gguf_x16_b32_unpack(w uint8 [N / 16, K / 32 * 16 S], qtype, N, rows int64 [R]?) -> uint8 [R or N, K / 32 * S]
//       (the stored rows back, bit for bit: gguf_dequantize on them is the reference dequantization)
//   gguf_x16_b32_linear(x [rows, K] float32|bfloat16, w x16, qtype, N, bias float32 [N]?) -> [rows, N] in x's
//       dtype: per block d * sum(x c) (+ m * sum(x) for Q4_1 / Q5_1), c the signed code (Q4_0: q - 8, Q5_0: q - 16),
//       fp32 accumulation, bias added in fp32, one RNE rounding for bf16 output; dequantize-then-matmul up to fp32
//       rounding.
//
// Paths: AVX-512 fp32 x: a shift and a vpermps (a 16-entry table of the signed codes, q - 8 for Q4_0, indexed by the
// nibble: the bits above it are ignored; Q5: the 5th bit merged in by a ternary-logic op, a 32-entry vpermt2ps) make
// a vector of codes, then FMAs; bf16 x on AVX512-BF16: a shift and one ternary-logic op (Q5: two) make a column's
// two codes the bf16 pair 128 + q (0x4300 | q, exact, as csrc/gguf_x16.cpp does) for vdpbf16ps against the broadcast
// x pair, 128 sum(x) (Q4_0: 136, Q5_0: 144) taken off per block (a vpermw lookup of the signed codes, with nothing
// to cancel, measured 6-7 % slower under load). Q8_0 runs fp32 FMAs for either x (bf16 x widened, exact): a sign-
// extending load and a convert per 16 codes, as cheap per value as a bf16 route (an int8 is not one bf16 bit pattern
// away: its bf16 pair needs two nibble lookups; that layout measured 1.45x the stored kernel in bf16 and 0.8x in
// fp32, this one 1.5x in both, under load). AVX2 + FMA + F16C (and bf16 x without AVX512-BF16, widened to fp32
// first): mask (Q5: or the 5th bit) and convert (Q4_0's 8 / Q5_0's 16 sum(x) taken off per block), two halves of 8
// columns.
// Each row keeps 4 accumulators per block (one per field r), reset per block, so one-row decode has 4 chains in
// flight per block and consecutive blocks overlap (out-of-order); the count does not depend on the rows per pass.
// The nibble order, the weight check and the repack / unpack drivers are gguf_x16.h's (shared with gguf_x16.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"
#include "gguf_format.h"
#include "gguf_x16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__BMI2__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define B32_VEC 1
#if defined(__AVX512F__)
#define B32_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define B32_BF16 1
#endif
#endif
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

namespace gg = frugallm::gguf;

constexpr int64_t kRowsPass = 4;  // input rows per pass over a group's weights

// Geometry of one type's x16 block: `stored` bytes per row per block in the file, `head` bytes of fp16 fields per
// 16 rows, then `qh` bytes of 5th code bits (Q5_0 / Q5_1), then the codes.
struct Layout {
  int64_t stored, head, qh;
  constexpr int64_t block() const { return 16 * stored; }
  constexpr int64_t codes() const { return head + qh; }
};

constexpr bool has_min(int64_t qt) { return qt == gg::Q4_1 || qt == gg::Q5_1; }  // w = d q + m
constexpr bool has_qh(int64_t qt) { return qt == gg::Q5_0 || qt == gg::Q5_1; }
constexpr int zero_of(int64_t qt) { return qt == gg::Q4_0 ? 8 : qt == gg::Q5_0 ? 16 : 0; }  // w = d (q - zero)

constexpr Layout layout_of(int64_t qtype) {
  switch (qtype) {
    case gg::Q4_0: return {18, 32, 0};
    case gg::Q4_1: return {20, 64, 0};
    case gg::Q5_0: return {22, 32, 64};
    case gg::Q5_1: return {24, 64, 64};
    case gg::Q8_0: return {34, 32, 0};
    default: return {0, 0, 0};
  }
}

Layout checked_layout(const char* op, int64_t qtype) {
  const Layout l = layout_of(qtype);
  TORCH_CHECK(l.stored != 0, op, ": only Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7) and Q8_0 (8) are repacked here, got "
              "qtype ", qtype);
  return l;
}

using frugallm::x16::pack_dword;
using frugallm::x16::unpack_dword;

constexpr const char* name_of(int64_t qt) {
  return qt == gg::Q4_0 ? "Q4_0" : qt == gg::Q4_1 ? "Q4_1" : qt == gg::Q5_0 ? "Q5_0" : qt == gg::Q5_1 ? "Q5_1" : "Q8_0";
}

constexpr frugallm::x16::Format format_of(int64_t qt) {
  return {name_of(qt), layout_of(qt).stored, layout_of(qt).block()};
}

// 16 rows' stored blocks (rows row_bytes apart) -> one x16 block, and column c of one back to its stored bytes.
template <int64_t QT>
void repack_block(const uint8_t* src, int64_t row_bytes, uint8_t* dst) {
  constexpr Layout L = layout_of(QT);
  for (int c = 0; c < 16; ++c) {
    const uint8_t* p = src + c * row_bytes;
    std::memcpy(dst + 2 * c, p, 2);
    if constexpr (has_min(QT)) std::memcpy(dst + 32 + 2 * c, p + 2, 2);
    if constexpr (has_qh(QT)) {  // value v = 8 z + 2 r + s: bit v of qh -> bit 16 s + 4 r + z of the column's dword
      uint32_t qh, hb = 0;
      std::memcpy(&qh, p + L.stored - 20, 4);
      for (int v = 0; v < 32; ++v) hb |= ((qh >> v) & 1u) << (16 * (v % 2) + 4 * (v % 8 / 2) + v / 8);
      std::memcpy(dst + L.head + 4 * c, &hb, 4);
    }
    if constexpr (QT == gg::Q8_0) {
      for (int v = 0; v < 32; ++v) dst[L.head + 16 * v + c] = p[2 + v];
    } else {
      for (int z = 0; z < 4; ++z) {  // values 0..15 are the low nibbles of qs[0..15], 16..31 the high ones
        uint64_t bytes;
        std::memcpy(&bytes, p + L.stored - 16 + 8 * (z % 2), 8);
        const uint32_t u = pack_dword(bytes, z / 2);
        std::memcpy(dst + L.codes() + 64 * z + 4 * c, &u, 4);
      }
    }
  }
}

template <int64_t QT>
void unpack_row(const uint8_t* blk, int c, uint8_t* p) {
  constexpr Layout L = layout_of(QT);
  std::memcpy(p, blk + 2 * c, 2);
  if constexpr (has_min(QT)) std::memcpy(p + 2, blk + 32 + 2 * c, 2);
  if constexpr (has_qh(QT)) {
    uint32_t hb, qh = 0;
    std::memcpy(&hb, blk + L.head + 4 * c, 4);
    for (int v = 0; v < 32; ++v) qh |= ((hb >> (16 * (v % 2) + 4 * (v % 8 / 2) + v / 8)) & 1u) << v;
    std::memcpy(p + L.stored - 20, &qh, 4);
  }
  if constexpr (QT == gg::Q8_0) {
    for (int v = 0; v < 32; ++v) p[2 + v] = blk[L.head + 16 * v + c];
  } else {
    for (int z = 0; z < 2; ++z) {
      uint32_t lo, hi;
      std::memcpy(&lo, blk + L.codes() + 64 * z + 4 * c, 4);
      std::memcpy(&hi, blk + L.codes() + 64 * (z + 2) + 4 * c, 4);
      const uint64_t bytes = unpack_dword(lo, 0) | unpack_dword(hi, 1);
      std::memcpy(p + L.stored - 16 + 8 * z, &bytes, 8);
    }
  }
}

template <int64_t QT>
at::Tensor repack_typed(const at::Tensor& w) {
  return frugallm::x16::repack(w, "gguf_x16_b32_repack", format_of(QT), repack_block<QT>);
}

template <int64_t QT>
at::Tensor unpack_typed(const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& rows) {
  return frugallm::x16::unpack(w, n, rows, "gguf_x16_b32_unpack", format_of(QT), unpack_row<QT>);
}

at::Tensor gguf_x16_b32_repack(const at::Tensor& w, int64_t qtype) {
  checked_layout("gguf_x16_b32_repack", qtype);
  switch (qtype) {
    case gg::Q4_0: return repack_typed<gg::Q4_0>(w);
    case gg::Q4_1: return repack_typed<gg::Q4_1>(w);
    case gg::Q5_0: return repack_typed<gg::Q5_0>(w);
    case gg::Q5_1: return repack_typed<gg::Q5_1>(w);
    default: return repack_typed<gg::Q8_0>(w);
  }
}

at::Tensor gguf_x16_b32_unpack(const at::Tensor& w, int64_t qtype, int64_t n, const std::optional<at::Tensor>& rows) {
  checked_layout("gguf_x16_b32_unpack", qtype);
  switch (qtype) {
    case gg::Q4_0: return unpack_typed<gg::Q4_0>(w, n, rows);
    case gg::Q4_1: return unpack_typed<gg::Q4_1>(w, n, rows);
    case gg::Q5_0: return unpack_typed<gg::Q5_0>(w, n, rows);
    case gg::Q5_1: return unpack_typed<gg::Q5_1>(w, n, rows);
    default: return unpack_typed<gg::Q8_0>(w, n, rows);
  }
}

// The value the vector paths give code i of type QT (signed: Q4_0's / Q5_0's offset is in the table).
constexpr float code_value(int64_t qt, int i) { return static_cast<float>(i - zero_of(qt)); }

// The 5th code bits of field (r, z) (at 16 s + 4 r + z in the qh dword) moved to bit 4 of each 16-bit half: a right
// shift by sh = 4 r + z - 4 (12 + 4 r + z: half 1 alone, at bit 4 of the dword), a left shift where sh < 0.
#if defined(B32_AVX512)
inline __m512i qh_at4_512(__m512i hb, int sh) {
  return sh >= 0 ? _mm512_srli_epi32(hb, sh) : _mm512_slli_epi32(hb, -sh);
}
#endif
#if defined(B32_VEC) && !defined(B32_AVX512)
inline __m256i qh_at4_256(__m256i hb, int sh) {
  return sh >= 0 ? _mm256_srli_epi32(hb, sh) : _mm256_slli_epi32(hb, -sh);
}
#endif

#if defined(B32_AVX512)
template <int64_t QT>
inline __m512 table_512(int half) {  // codes 16 half .. 16 half + 15
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = code_value(QT, 16 * half + i);
  return _mm512_load_ps(t);
}

// One block's contribution to a row's 16 columns: t += d * (a0 + a1 + a2 + a3) (+ m * sum(x) for Q4_1), the
// accumulator sum in one fixed order.
template <int64_t QT>
inline __m512 block_end_512(const uint8_t* b, const __m512* a, float xs, __m512 t) {
  const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  t = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])), dv, t);
  if constexpr (has_min(QT))
    t = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32))),
                        _mm512_set1_ps(xs), t);
  return t;
}

// res[m][c] = sum over blocks of d * sum(x code) (+ m * sum(x)), fp32 x rows x[m * k ...].
template <int64_t QT, int MC>
void group_f32_512(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs32, float* res) {
  constexpr Layout L = layout_of(QT);
  const __m512 tab = table_512<QT>(0), tab_hi = table_512<QT>(1);
  const __m512i m15 = _mm512_set1_epi32(15);
  __m512 t[MC];
  for (int m = 0; m < MC; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * L.block();
    __m512 a[MC][4];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < 4; ++r) a[m][r] = _mm512_setzero_ps();
    if constexpr (QT == gg::Q8_0) {
#pragma GCC unroll 32
      for (int v = 0; v < 32; ++v) {  // value v of the 16 columns: sign-extend, convert
        const __m512 q = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + L.head + 16 * v))));
        for (int m = 0; m < MC; ++m)
          a[m][v % 4] = _mm512_fmadd_ps(q, _mm512_set1_ps(x[m * k + 32 * blk + v]), a[m][v % 4]);
      }
    } else {
      [[maybe_unused]] const __m512i hb = has_qh(QT) ? _mm512_loadu_si512(b + L.head) : _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int z = 0; z < 4; ++z) {
        const __m512i d = _mm512_loadu_si512(b + L.codes() + 64 * z);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          __m512 v0, v1;
          if constexpr (has_qh(QT)) {  // the 5-bit code (bit 4 from qh; bits above it ignored) in a 32-entry table
            const __m512i i0 =
                _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4 * r), qh_at4_512(hb, 4 * r + z - 4), m15, 0xE4);
            const __m512i i1 =
                _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 16 + 4 * r), qh_at4_512(hb, 12 + 4 * r + z), m15, 0xE4);
            v0 = _mm512_permutex2var_ps(tab, i0, tab_hi);
            v1 = _mm512_permutex2var_ps(tab, i1, tab_hi);
          } else {
            v0 = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4 * r), tab);
            v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16 + 4 * r), tab);
          }
          for (int m = 0; m < MC; ++m) {
            const float* xm = x + m * k + 32 * blk + 8 * z + 2 * r;
            a[m][r] = _mm512_fmadd_ps(v0, _mm512_set1_ps(xm[0]), a[m][r]);
            a[m][r] = _mm512_fmadd_ps(v1, _mm512_set1_ps(xm[1]), a[m][r]);
          }
        }
      }
    }
    for (int m = 0; m < MC; ++m) t[m] = block_end_512<QT>(b, a[m], xs32[m * (k / 32) + blk], t[m]);
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, t[m]);
}
#endif

#if defined(B32_BF16)
template <int64_t QT, int MC>
void group_bf16_512(const uint8_t* w, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs32, float* res) {
  constexpr Layout L = layout_of(QT);
  const __m512i nib = _mm512_set1_epi32(0x000F000F), code5 = _mm512_set1_epi32(0x001F001F),
                magic = _mm512_set1_epi32(0x43004300);
  __m512 t[MC];
  for (int m = 0; m < MC; ++m) t[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * L.block();
    __m512 a[MC][4];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < 4; ++r) a[m][r] = _mm512_setzero_ps();
    [[maybe_unused]] const __m512i hb = has_qh(QT) ? _mm512_loadu_si512(b + L.head) : _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) {
      const __m512i d = _mm512_loadu_si512(b + L.codes() + 64 * z);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        // lane c: the codes of values 8 z + 2 r and 8 z + 2 r + 1 as the bf16 pair 128 + q (0x4300 | q, exact)
        __m512bh v;
        if constexpr (has_qh(QT)) {  // nibbles (0xE4: C ? A : B) with the 5th bits at bit 4, then 0x4300 | q
          const __m512i q =
              _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4 * r), qh_at4_512(hb, 4 * r + z - 4), nib, 0xE4);
          v = (__m512bh)_mm512_ternarylogic_epi32(q, code5, magic, 0xEA);
        } else {
          v = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4 * r), nib, magic, 0xEA);
        }
        for (int m = 0; m < MC; ++m) {
          const float* xm = reinterpret_cast<const float*>(x + m * k + 32 * blk + 8 * z + 2 * r);  // bf16 pair
          a[m][r] = _mm512_dpbf16_ps(a[m][r], v, (__m512bh)_mm512_set1_ps(xm[0]));
        }
      }
    }
    for (int m = 0; m < MC; ++m) {
      const float xs = xs32[m * (k / 32) + blk];
      // sum(x (128 + q)) - 128 sum(x) = sum(x q); Q4_0's code is q - 8: 136, Q5_0's q - 16: 144 (the cancellation
      // stays within 32 values)
      a[m][0] = _mm512_sub_ps(a[m][0], _mm512_set1_ps(static_cast<float>(128 + zero_of(QT)) * xs));
      t[m] = block_end_512<QT>(b, a[m], xs, t[m]);
    }
  }
  for (int m = 0; m < MC; ++m) _mm512_storeu_ps(res + 16 * m, t[m]);
}
#endif

#if defined(B32_VEC) && !defined(B32_AVX512)
// AVX2: the 16 columns as two halves of 8 lanes (h: columns 8h..8h+7), same arithmetic per column as AVX-512.
template <int64_t QT, int MC>
void group_f32_256(const uint8_t* w, int64_t nblocks, const float* x, int64_t k, const float* xs32, float* res) {
  constexpr Layout L = layout_of(QT);
  const __m256i m15 = _mm256_set1_epi32(15), m16 = _mm256_set1_epi32(16);
  for (int h = 0; h < 2; ++h) {
    __m256 t[MC];
    for (int m = 0; m < MC; ++m) t[m] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = w + blk * L.block();
      __m256 a[MC][4];
      for (int m = 0; m < MC; ++m)
        for (int r = 0; r < 4; ++r) a[m][r] = _mm256_setzero_ps();
      if constexpr (QT == gg::Q8_0) {
#pragma GCC unroll 32
        for (int v = 0; v < 32; ++v) {
          const __m256 q = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + L.head + 16 * v + 8 * h))));
          for (int m = 0; m < MC; ++m)
            a[m][v % 4] = _mm256_fmadd_ps(q, _mm256_set1_ps(x[m * k + 32 * blk + v]), a[m][v % 4]);
        }
      } else {
        [[maybe_unused]] const __m256i hb =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (has_qh(QT) ? L.head + 32 * h : 0)));
        for (int z = 0; z < 4; ++z) {
          const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + L.codes() + 64 * z + 32 * h));
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) {  // the code as fp32 (Q4_0's / Q5_0's offset: zero * sum(x) per block, below)
            __m256i q0 = _mm256_and_si256(_mm256_srli_epi32(d, 4 * r), m15);
            __m256i q1 = _mm256_and_si256(_mm256_srli_epi32(d, 16 + 4 * r), m15);
            if constexpr (has_qh(QT)) {
              q0 = _mm256_or_si256(q0, _mm256_and_si256(qh_at4_256(hb, 4 * r + z - 4), m16));
              q1 = _mm256_or_si256(q1, _mm256_and_si256(qh_at4_256(hb, 12 + 4 * r + z), m16));
            }
            const __m256 v0 = _mm256_cvtepi32_ps(q0), v1 = _mm256_cvtepi32_ps(q1);
            for (int m = 0; m < MC; ++m) {
              const float* xm = x + m * k + 32 * blk + 8 * z + 2 * r;
              a[m][r] = _mm256_fmadd_ps(v0, _mm256_set1_ps(xm[0]), a[m][r]);
              a[m][r] = _mm256_fmadd_ps(v1, _mm256_set1_ps(xm[1]), a[m][r]);
            }
          }
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * h)));
      for (int m = 0; m < MC; ++m) {
        __m256 sum = _mm256_add_ps(_mm256_add_ps(a[m][0], a[m][1]), _mm256_add_ps(a[m][2], a[m][3]));
        if constexpr (zero_of(QT) != 0)
          sum = _mm256_sub_ps(sum, _mm256_set1_ps(static_cast<float>(zero_of(QT)) * xs32[m * (k / 32) + blk]));
        t[m] = _mm256_fmadd_ps(sum, dv, t[m]);
        if constexpr (has_min(QT)) {
          const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + 16 * h)));
          t[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs32[m * (k / 32) + blk]), t[m]);
        }
      }
    }
    for (int m = 0; m < MC; ++m) _mm256_storeu_ps(res + 16 * m + 8 * h, t[m]);
  }
}
#endif

// Per row and 32-value block, sum(x) in fp32 (a fixed order per row: independent of the pass); Q4_1's min term.
template <typename T>
std::vector<float> block_sums(const T* x, int64_t rows, int64_t k) {
  std::vector<float> xs(rows * (k / 32));
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < k / 32; ++j) {
      float s = 0.0f;
      for (int64_t i = 0; i < 32; ++i) s += frugallm::to_float(x[m * k + 32 * j + i]);
      xs[m * (k / 32) + j] = s;
    }
  return xs;
}

using GroupF32 = void (*)(const uint8_t*, int64_t, const float*, int64_t, const float*, float*);
using GroupBF16 = void (*)(const uint8_t*, int64_t, const uint16_t*, int64_t, const float*, float*);

// Runs group[mc - 1](w_g, nblocks, x rows, k, xs, res[mc][16]) over groups x row passes; stores res + bias as OutT.
template <typename XT, typename OutT, typename Fn>
void run_groups(const uint8_t* w, int64_t n, int64_t nblocks, int64_t block_bytes, const XT* x, int64_t rows,
                int64_t k, const float* xs, const float* bias, OutT* y, const Fn* group) {
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    float res[kRowsPass * 16];
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += kRowsPass) {
        const int64_t mc = std::min<int64_t>(kRowsPass, rows - m0);
        group[mc - 1](w + g * nblocks * block_bytes, nblocks, x + m0 * k, k, xs + m0 * (k / 32), res);
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

#if defined(B32_VEC)
template <int64_t QT>
struct Kernels {
#if defined(B32_AVX512)
  static constexpr GroupF32 f32[kRowsPass] = {group_f32_512<QT, 1>, group_f32_512<QT, 2>, group_f32_512<QT, 3>,
                                              group_f32_512<QT, 4>};
#else
  static constexpr GroupF32 f32[kRowsPass] = {group_f32_256<QT, 1>, group_f32_256<QT, 2>, group_f32_256<QT, 3>,
                                              group_f32_256<QT, 4>};
#endif
#if defined(B32_BF16)
  static constexpr GroupBF16 bf16[kRowsPass] = {group_bf16_512<QT, 1>, group_bf16_512<QT, 2>, group_bf16_512<QT, 3>,
                                                group_bf16_512<QT, 4>};  // Q4_0 / Q4_1 only
#endif
};

// Whether the kernels read sum(x) per block: Q4_1's min term, the bf16 path's 128 offset, Q4_0's 8 on AVX2.
template <int64_t QT>
constexpr bool kSums = QT != gg::Q8_0;

template <int64_t QT>
void linear_typed(const at::Tensor& xc, const uint8_t* wp, int64_t n, const float* bp, at::Tensor& y) {
  constexpr Layout L = layout_of(QT);
  const int64_t rows = xc.size(0), k = xc.size(1), nblocks = k / 32;
  if (xc.scalar_type() == at::kFloat) {
    const float* xp = xc.data_ptr<float>();
    const std::vector<float> xs = kSums<QT> ? block_sums(xp, rows, k) : std::vector<float>(rows * nblocks);
    run_groups(wp, n, nblocks, L.block(), xp, rows, k, xs.data(), bp, y.data_ptr<float>(), Kernels<QT>::f32);
    return;
  }
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const std::vector<float> xs =
      kSums<QT> ? block_sums(xc.data_ptr<at::BFloat16>(), rows, k) : std::vector<float>(rows * nblocks);
#if defined(B32_BF16)
  if constexpr (QT != gg::Q8_0) {
    const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    run_groups(wp, n, nblocks, L.block(), xb, rows, k, xs.data(), bp, yb, Kernels<QT>::bf16);
    return;
  }
#endif
  const std::vector<float> xf = frugallm::rows_as_float(xc);  // fp32 FMAs here: widen x (exact)
  run_groups(wp, n, nblocks, L.block(), xf.data(), rows, k, xs.data(), bp, yb, Kernels<QT>::f32);
}
#endif

at::Tensor gguf_x16_b32_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                               const std::optional<at::Tensor>& bias) {
  const char* op = "gguf_x16_b32_linear";
  TORCH_CHECK(kVectorized, op, ": this build has no vector path (needs AVX2 + FMA + F16C)");
  checked_layout(op, qtype);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x must be a CPU float32 or bfloat16 [rows, K] tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t k = xc.size(1);
  TORCH_CHECK(k > 0 && k % 32 == 0, op, ": in_features ", k, " is not a positive multiple of 32");
  frugallm::x16::check_weight(op, w, n, k / 32, format_of(qtype));
  const float* bp = frugallm::bias_ptr(bias, n);
  at::Tensor y = at::empty({xc.size(0), n}, xc.options());
  if (xc.size(0) == 0) return y;
#if defined(B32_VEC)
  const uint8_t* wp = w.data_ptr<uint8_t>();
  switch (qtype) {
    case gg::Q4_0: linear_typed<gg::Q4_0>(xc, wp, n, bp, y); break;
    case gg::Q4_1: linear_typed<gg::Q4_1>(xc, wp, n, bp, y); break;
    case gg::Q5_0: linear_typed<gg::Q5_0>(xc, wp, n, bp, y); break;
    case gg::Q5_1: linear_typed<gg::Q5_1>(xc, wp, n, bp, y); break;
    default: linear_typed<gg::Q8_0>(xc, wp, n, bp, y); break;
  }
#endif
  return y;
}

bool gguf_x16_b32_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("gguf_x16_b32_repack(Tensor w, int qtype) -> Tensor");
  m.def("gguf_x16_b32_unpack(Tensor w, int qtype, int out_features, Tensor? rows) -> Tensor");
  m.def("gguf_x16_b32_linear(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_x16_b32_vectorized() -> bool", &gguf_x16_b32_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("gguf_x16_b32_repack", &gguf_x16_b32_repack);
  m.impl("gguf_x16_b32_unpack", &gguf_x16_b32_unpack);
  m.impl("gguf_x16_b32_linear", &gguf_x16_b32_linear);
}
