// requires: avx512bf16 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Group-wise int2/int3/int4/int6/int8 linear for a few rows (decode) on GroupQuantLinear's "packed" storage
// (quant/packing.py). A weight row holds K codes of BITS bits, planar: with V codes per chunk (int3: 8 codes in
// 3 bytes) the row is cut into V planes of m = ceil(K / V) consecutive codes; code k = i * m + p sits in bits
// [i * BITS, (i + 1) * BITS) of the little-endian word at position p, and the row stores that word's bytes as
// byte-planes (byte j of word p at j * m + p). Per group of g columns: w = code * scale + offset (symmetric:
// offset = -2^(BITS-1) * scale). Registered as torch.ops.frugallm.lowbit_linear.
//
// Why a kernel: torch has no 2/3/6-bit matmul, so the module unpacked and dequantized the whole weight on every
// call (int3 decode ~57 ms per token on SmolLM2). Here 16 positions of a row are widened to 32-bit words at once
// (one byte-plane load each) and V shifts give V runs of 16 codes, written in column order to a small fp32
// buffer; the dot product then walks the buffer group by group against x. Each thread streams a contiguous run
// of output rows, 4 at a time, with up to 4 inputs per pass.
//
// Fast path (AVX512-BF16, up to 6 bits, groups of a power of two, m % 8 == 0: int2/int4/int6 on K % 32 == 0,
// int3 on K % 64 == 0):
// no buffer and no int-to-float conversion. 32 positions are widened to 16-bit lanes; a shift and one
// vpternlogd turn a plane into 32 bf16 values 128 + code (0x4300 | code is exact), and vdpbf16ps multiplies
// them with the bf16 input as it is. Each 16-column half lies in one group, so a chunk's result takes its two
// group scales from one vector; the offsets and the 128 bias come back once per row as a dot of the
// per-group (scale, offset) with per-group sums of x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FRUGALLM_LOWBIT_AVX512 1
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

constexpr int64_t kRowsPerTile = 4;
constexpr int64_t kMaxRows = 4;
constexpr int kPrefetchBytes = 4096;

using frugallm::to_float;

struct Layout {
  int64_t k, group, groups, planes, plane_len, row_bytes;  // planes = V, plane_len = m, row_bytes = bytes * m
  int64_t params;                                          // 2: (scale, offset) per group; 1: symmetric
  int group_shift;                                         // log2(group) for a power of two, else -1
};

// (scale, offset) of group g of weight row r: symmetric groups store the scale alone, offset -2^(BITS-1) * scale.
template <int BITS, typename S>
inline std::pair<float, float> group_params(const S* qscale, const Layout& l, int64_t r, int64_t g) {
  const S* q = qscale + (r * l.groups + g) * l.params;
  const float scale = to_float(q[0]);
  return {scale, l.params == 2 ? to_float(q[1]) : -static_cast<float>(1 << (BITS - 1)) * scale};
}

template <int BITS>
struct Planar {
  static constexpr int kValues = 8 / std::gcd(8, BITS);  // codes per chunk
  static constexpr int kBytes = kValues * BITS / 8;      // bytes per chunk
};

// Codes of one packed row -> fp32 in column order: dst[i * m + p] = code (i * m + p); dst holds V * m floats.
template <int BITS>
void decode_row(const uint8_t* src, int64_t m, float* dst) {
  constexpr int V = Planar<BITS>::kValues, B = Planar<BITS>::kBytes;
#if defined(FRUGALLM_LOWBIT_AVX512)
  const __m512i code_mask = _mm512_set1_epi32((1 << BITS) - 1);
  for (int64_t p0 = 0; p0 < m; p0 += 16) {
    const __mmask16 mask =
        m - p0 >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (m - p0)) - 1u);
    __m512i word = _mm512_setzero_si512();
#pragma GCC unroll 3
    for (int j = 0; j < B; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(src + j * m + p0) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, src + j * m + p0));
      word = _mm512_or_si512(word, _mm512_slli_epi32(bytes, 8 * j));
    }
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) {
      const __m512i code = _mm512_and_si512(_mm512_srli_epi32(word, i * BITS), code_mask);
      _mm512_mask_storeu_ps(dst + i * m + p0, mask, _mm512_cvtepi32_ps(code));
    }
  }
#else
  for (int64_t p = 0; p < m; ++p) {
    uint32_t word = 0;
    for (int j = 0; j < B; ++j) word |= static_cast<uint32_t>(src[j * m + p]) << (8 * j);
    for (int i = 0; i < V; ++i) dst[i * m + p] = static_cast<float>((word >> (i * BITS)) & ((1u << BITS) - 1u));
  }
#endif
}

// out[r][m] = sum_k w[r][k] * x[m][k] for `rows` (<= 4) weight rows and MC (<= 4) inputs; `codes` holds the
// rows decoded by decode_row, `stride` floats apart.
template <int BITS, int MC, typename S>
void dot_tile(const float* codes, int64_t stride, const S* qscale, const Layout& l, const float* x, int64_t rows,
              float out[kRowsPerTile][kMaxRows]) {
#if defined(FRUGALLM_LOWBIT_AVX512)
  __m512 acc[kRowsPerTile][MC];
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < l.groups; ++g) {
    __m512 s[kRowsPerTile], o[kRowsPerTile];
#pragma GCC unroll 4
    for (int r = 0; r < kRowsPerTile; ++r) {
      const auto [scale, offset] = r < rows ? group_params<BITS>(qscale, l, r, g) : std::pair<float, float>{};
      s[r] = _mm512_set1_ps(scale);
      o[r] = _mm512_set1_ps(offset);
    }
    for (int64_t c = g * l.group; c < (g + 1) * l.group; c += 16) {
      __m512 xv[MC];
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_ps(x + m * l.k + c);
#pragma GCC unroll 4
      for (int r = 0; r < kRowsPerTile; ++r) {
        const __m512 w = _mm512_fmadd_ps(_mm512_loadu_ps(codes + r * stride + c), s[r], o[r]);
#pragma GCC unroll 4
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MC; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MC; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < l.groups; ++g) {
        const auto [scale, offset] = group_params<BITS>(qscale, l, r, g);
        for (int64_t c = g * l.group; c < (g + 1) * l.group; ++c)
          acc += (codes[r * stride + c] * scale + offset) * x[m * l.k + c];
      }
      out[r][m] = acc;
    }
#endif
}


#if defined(FRUGALLM_LOWBIT_AVX512) && defined(__AVX512BF16__)
#define FRUGALLM_LOWBIT_BF16 1

// n (scale, offset) parameters of type S -> fp32, vectorized (a row's parameters are converted once per row).
inline const float* params_f32(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
  return dst;
}
inline const float* params_f32(const c10::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  for (; i < n; ++i) dst[i] = to_float(src[i]);
  return dst;
}

// out[r][m] = sum_k w[r][k] * x[m][k] straight from the packed rows (see the header). `coef` holds, per input,
// the per-group multipliers of (scale, offset) that restore the offsets and remove the 128 bias.
// P is the number of parameters per group (2: scale and offset; 1: symmetric); SHIFTED: planes of m % 16 == 8.
template <int BITS, int P, bool SHIFTED, int MC, typename S>
void dot_tile_bf16(const uint8_t* qweight, const S* qscale, const Layout& l, const uint16_t* x, const float* coef,
                   int64_t rows, float out[kRowsPerTile][kMaxRows]) {
  constexpr int B = Planar<BITS>::kBytes, V = Planar<BITS>::kValues;
  const int64_t m = l.plane_len, k = l.k, np = l.groups * P;
  const int shift = l.group_shift;
  const int64_t last_group = l.groups - 1;
  thread_local std::vector<float> param_buf;
  if (static_cast<int64_t>(param_buf.size()) < np) param_buf.resize(np);
  const __m512i code_mask = _mm512_set1_epi16((1 << BITS) - 1), magic = _mm512_set1_epi16(0x4300);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = qweight + r * l.row_bytes;
    const float* qf = params_f32(qscale + r * np, np, param_buf.data());
    __m512 acc[4][MC];  // four independent FMA chains per input
    for (int j = 0; j < MC; ++j) {  // the offsets' share, as a vector: reduced with the rest at the end
      __m512 off = _mm512_setzero_ps();
      for (int64_t i = 0; i < np; i += 16) {
        const __mmask16 mask =
            np - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (np - i)) - 1u);
        off = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, qf + i), _mm512_maskz_loadu_ps(mask, coef + j * np + i), off);
      }
      acc[0][j] = off;
      acc[1][j] = acc[2][j] = acc[3][j] = _mm512_setzero_ps();
    }
    // Steps of 32 positions. With SHIFTED (m % 16 == 8) the odd planes, which start 8 columns past a multiple of
    // 16, step from position -24 instead (their first step holds positions 0-7 only), so every step of every
    // plane starts on a multiple of 16 columns. Masked-off lanes are never read.
    constexpr int kPhases = SHIFTED ? 2 : 1;
    for (int64_t s0 = 0; s0 < (SHIFTED ? m + 24 : m); s0 += 32) {
      __m512i bytes[kPhases][B];
      __mmask32 pos_mask[kPhases];
#pragma GCC unroll 2
      for (int h = 0; h < kPhases; ++h) {
        const int64_t p0 = s0 - 24 * h, lo = std::max<int64_t>(0, -p0), hi = std::min<int64_t>(32, m - p0);
        pos_mask[h] = hi <= lo ? 0u : (hi == 32 ? ~0u : (1u << hi) - 1u) & ~((1u << lo) - 1u);
#pragma GCC unroll 3
        for (int j = 0; j < B; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(src + j * m + s0) + kPrefetchBytes, _MM_HINT_T0);
          bytes[h][j] = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(pos_mask[h], src + j * m + p0));
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) {
        const int h = SHIFTED ? (i & 1) : 0;
        if (SHIFTED && pos_mask[h] == 0) continue;
        const int64_t c0 = i * m + s0 - 24 * h;  // plane i's columns: the bf16 path has K == V * m, no padding
        const int bit = i * BITS, byte = bit / 8, bit_shift = bit % 8;
        // 16-bit lanes of bytes `byte` and `byte + 1`: the code never crosses them (shift + BITS <= 16).
        const __m512i word = byte + 1 < B ? _mm512_or_si512(bytes[h][byte], _mm512_slli_epi16(bytes[h][byte + 1], 8))
                                          : bytes[h][byte];
        const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(word, bit_shift), code_mask, magic, 0xEA);
        // dpbf16 lane j sums columns 2j and 2j + 1: lanes 0-7 are the first 16 columns, each half in one group.
        const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(qf[(std::max<int64_t>(c0, 0) >> shift) * P]),
                                                _mm256_set1_ps(qf[std::min((c0 + 16) >> shift, last_group) * P]), 1);
#pragma GCC unroll 4
        for (int j = 0; j < MC; ++j) {
          const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(pos_mask[h], x + j * k + c0);
          acc[i & 3][j] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w, xv), scale, acc[i & 3][j]);
        }
      }
    }
    for (int j = 0; j < MC; ++j) out[r][j] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]), _mm512_add_ps(acc[2][j], acc[3][j])));
  }
}

// Whether dot_tile_bf16 serves this layout.
template <int BITS>
bool bf16_path(const Layout& l) {
  // No padding (V * m == K), groups of 16, 32, 64, ... columns, and planes of whole 8-column quarters: every
  // plane step can then start on a multiple of 16 columns, so each 16-column half lies in one group.
  return BITS <= 6 && l.plane_len * l.planes == l.k && l.group_shift >= 4 &&
         (l.plane_len % 16 == 0 || (l.plane_len % 16 == 8 && l.plane_len >= 24));
}
#else
template <int BITS>
bool bf16_path(const Layout&) {
  return false;
}
#endif

template <int BITS, typename S>
void run_bf16(const float* xf, const uint16_t* xb, int64_t rows, const uint8_t* qweight, const S* qscale,
              const Layout& l, const float* bias, uint16_t* y, int64_t n) {
#if defined(FRUGALLM_LOWBIT_BF16)
  // Per input and group: sum of x. The parameters' multipliers: scale * (-128 * xsum) (the bias of the bf16
  // codes) and offset * xsum; symmetric groups have offset = -2^(BITS-1) * scale.
  const int64_t np = l.groups * l.params;
  std::vector<float> coef(rows * np);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t g = 0; g < l.groups; ++g) {
      float xs = 0.0f;
      for (int64_t c = g * l.group; c < (g + 1) * l.group; ++c) xs += xf[j * l.k + c];
      float* cg = coef.data() + j * np + g * l.params;
      if (l.params == 2) {
        cg[0] = -128.0f * xs;
        cg[1] = xs;
      } else {
        cg[0] = (-128.0f - static_cast<float>(1 << (BITS - 1))) * xs;
      }
    }
  using Tile = void (*)(const uint8_t*, const S*, const Layout&, const uint16_t*, const float*, int64_t,
                        float[kRowsPerTile][kMaxRows]);
  // [parameters: asymmetric / symmetric][planes: m % 16 == 0 / 8][inputs - 1]
  constexpr Tile all[2][2][kMaxRows] = {
      {{&dot_tile_bf16<BITS, 2, false, 1, S>, &dot_tile_bf16<BITS, 2, false, 2, S>,
        &dot_tile_bf16<BITS, 2, false, 3, S>, &dot_tile_bf16<BITS, 2, false, 4, S>},
       {&dot_tile_bf16<BITS, 2, true, 1, S>, &dot_tile_bf16<BITS, 2, true, 2, S>,
        &dot_tile_bf16<BITS, 2, true, 3, S>, &dot_tile_bf16<BITS, 2, true, 4, S>}},
      {{&dot_tile_bf16<BITS, 1, false, 1, S>, &dot_tile_bf16<BITS, 1, false, 2, S>,
        &dot_tile_bf16<BITS, 1, false, 3, S>, &dot_tile_bf16<BITS, 1, false, 4, S>},
       {&dot_tile_bf16<BITS, 1, true, 1, S>, &dot_tile_bf16<BITS, 1, true, 2, S>,
        &dot_tile_bf16<BITS, 1, true, 3, S>, &dot_tile_bf16<BITS, 1, true, 4, S>}}};
  const Tile* tiles = all[l.params == 2 ? 0 : 1][l.plane_len % 16 == 0 ? 0 : 1];
  frugallm::row_tiles<kRowsPerTile, kMaxRows>(
      n, rows, nullptr, bias, y,
      [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[kRowsPerTile][kMaxRows]) {
        tiles[mc - 1](qweight + n0 * l.row_bytes, qscale + n0 * np, l, xb + m0 * l.k, coef.data() + m0 * np, nr,
                      out);
      });
#else
  (void)xf, (void)xb, (void)rows, (void)qweight, (void)qscale, (void)l, (void)bias, (void)y, (void)n;
  TORCH_CHECK(false, "lowbit_linear: the bf16 path is not compiled in");
#endif
}

template <int BITS, typename S>
void run(const float* xf, const uint16_t* xb, int64_t rows, const uint8_t* qweight, const S* qscale, const Layout& l,
         const float* bias, uint16_t* y, int64_t n) {
  if constexpr (BITS <= 6) {
    if (bf16_path<BITS>(l)) return run_bf16<BITS>(xf, xb, rows, qweight, qscale, l, bias, y, n);
  }
  using Tile = void (*)(const float*, int64_t, const S*, const Layout&, const float*, int64_t,
                        float[kRowsPerTile][kMaxRows]);
  constexpr Tile tiles[kMaxRows] = {&dot_tile<BITS, 1, S>, &dot_tile<BITS, 2, S>, &dot_tile<BITS, 3, S>,
                                    &dot_tile<BITS, 4, S>};
  const int64_t stride = l.planes * l.plane_len + 16;  // decoded row: V * m codes (tail padding included)
  frugallm::row_tiles<kRowsPerTile, kMaxRows>(
      n, rows, nullptr, bias, y,
      [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[kRowsPerTile][kMaxRows]) {
        // One buffer per thread, decoded once per tile of rows and reused for every chunk of inputs.
        // (row_tiles visits a tile's input chunks in order, on one thread, starting at m0 = 0.)
        thread_local std::vector<float> codes;
        if (static_cast<int64_t>(codes.size()) < kRowsPerTile * stride) codes.assign(kRowsPerTile * stride, 0.0f);
        if (m0 == 0) {
          const uint8_t* src = qweight + n0 * l.row_bytes;
          for (int64_t r = 0; r < nr; ++r) decode_row<BITS>(src + r * l.row_bytes, l.plane_len, codes.data() + r * stride);
        }
        tiles[mc - 1](codes.data(), stride, qscale + n0 * l.groups * l.params, l, xf + m0 * l.k, nr, out);
      });
}

template <typename S>
void dispatch_bits(int64_t bits, const float* xf, const uint16_t* xb, int64_t rows, const uint8_t* qweight,
                   const S* qscale, const Layout& l, const float* bias, uint16_t* y, int64_t n) {
  switch (bits) {
    case 2: return run<2>(xf, xb, rows, qweight, qscale, l, bias, y, n);
    case 3: return run<3>(xf, xb, rows, qweight, qscale, l, bias, y, n);
    case 4: return run<4>(xf, xb, rows, qweight, qscale, l, bias, y, n);
    case 6: return run<6>(xf, xb, rows, qweight, qscale, l, bias, y, n);
    case 8: return run<8>(xf, xb, rows, qweight, qscale, l, bias, y, n);
    default: TORCH_CHECK(false, "lowbit_linear supports 2, 3, 4, 6 and 8 bits, got ", bits);
  }
}

// The checked layout of packed `bits`-bit codes for `k` input features (the ops' shared argument checks).
Layout checked_layout(const at::Tensor& qweight, const at::Tensor& qscale, int64_t bits, int64_t group_size,
                      int64_t k) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8,
              "lowbit_linear supports 2, 3, 4, 6 and 8 bits, got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && k % group_size == 0,
              "lowbit_linear needs group_size % 16 == 0 dividing in_features (", k, "), got ", group_size);
  const int64_t values = 8 / std::gcd<int64_t>(8, bits), nbytes = values * bits / 8;
  const int64_t plane_len = (k + values - 1) / values, groups = k / group_size;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.size(1) == plane_len * nbytes,
              "qweight must be a contiguous uint8 [out_features, ", plane_len * nbytes, "] tensor of packed ", bits,
              "-bit codes");
  TORCH_CHECK(qscale.dim() == 3 && qscale.is_contiguous() && qscale.size(0) == qweight.size(0) &&
                  qscale.size(1) == groups && (qscale.size(2) == 1 || qscale.size(2) == 2),
              "qscale must be a contiguous [out_features, ", groups, ", 1 or 2] tensor");
  const int shift = (group_size & (group_size - 1)) == 0 ? __builtin_ctzll(group_size) : -1;
  return Layout{k, group_size, groups, values, plane_len, plane_len * nbytes, qscale.size(2), shift};
}

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qscale, int64_t bits,
                         int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  const int64_t rows = x.size(0), n = qweight.size(0);
  const Layout l = checked_layout(qweight, qscale, bits, group_size, x.size(1));
  const float* b = frugallm::bias_ptr(bias, n);
  const std::vector<float> xf = frugallm::rows_as_float(x);
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  frugallm::with_param_type<false>(
      qscale, "qscale", [&](const auto* qs) { dispatch_bits(bits, xf.data(), xb, rows, qp, qs, l, b, yp, n); });
  return y;
}

// w[n, k] = code * scale + offset for the rows [begin, end) as bf16 (one fp32 FMA, one rounding).
template <int BITS, typename S>
void dequantize_rows(const uint8_t* qweight, const S* qscale, const Layout& l, int64_t begin, int64_t end,
                     uint16_t* w) {
  thread_local std::vector<float> codes;
  if (static_cast<int64_t>(codes.size()) < l.planes * l.plane_len + 16) codes.assign(l.planes * l.plane_len + 16, 0.f);
  for (int64_t r = begin; r < end; ++r) {
    decode_row<BITS>(qweight + r * l.row_bytes, l.plane_len, codes.data());
    uint16_t* out = w + r * l.k;
    for (int64_t g = 0; g < l.groups; ++g) {
      const auto [scale, offset] = group_params<BITS>(qscale, l, r, g);
      int64_t c = g * l.group;
#if defined(FRUGALLM_LOWBIT_BF16)
      const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
      for (; c < (g + 1) * l.group; c += 16) {
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_fmadd_ps(_mm512_loadu_ps(codes.data() + c), s, o));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), (__m256i)v);
      }
#endif
      for (; c < (g + 1) * l.group; ++c) out[c] = frugallm::float_to_bf16(codes[c] * scale + offset);
    }
  }
}

// The whole weight as bf16 [N, K]: passes of more than 16 rows (prefill) dequantize, then run a GEMM.
at::Tensor lowbit_dequantize(const at::Tensor& qweight, const at::Tensor& qscale, int64_t bits, int64_t group_size,
                             int64_t in_features) {
  const Layout l = checked_layout(qweight, qscale, bits, group_size, in_features);
  const int64_t n = qweight.size(0);
  at::Tensor w = at::empty({n, in_features}, qweight.options().dtype(at::kBFloat16));
  auto* wp = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  frugallm::with_param_type<false>(qscale, "qscale", [&](const auto* qs) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      switch (bits) {
        case 2: return dequantize_rows<2>(qp, qs, l, begin, end, wp);
        case 3: return dequantize_rows<3>(qp, qs, l, begin, end, wp);
        case 4: return dequantize_rows<4>(qp, qs, l, begin, end, wp);
        case 6: return dequantize_rows<6>(qp, qs, l, begin, end, wp);
        default: return dequantize_rows<8>(qp, qs, l, begin, end, wp);
      }
    });
  });
  return w;
}

bool lowbit_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("lowbit_linear(Tensor x, Tensor qweight, Tensor qscale, int bits, int group_size, Tensor? bias) -> Tensor");
  m.def("lowbit_dequantize(Tensor qweight, Tensor qscale, int bits, int group_size, int in_features) -> Tensor");
  m.def("lowbit_linear_vectorized() -> bool", &lowbit_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("lowbit_linear", &lowbit_linear);
  m.impl("lowbit_dequantize", &lowbit_dequantize);
}
