// requires: avx512bf16 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// BitMoD-style mix4 linear for a few rows (decode), on the stored format (quant/mix4.py): 4-bit codes packed
// planar per weight row (byte j: code j in the low nibble, code j + K/2 in the high one), a 2-bit data-type
// selector per group (planar too), fp16/bf16 (scale, offset) per group, and four 16-level grids:
// w = grid[sel][code] * scale + offset. Registered as torch.ops.frugallm.mix4_linear.
//
// Why a kernel: torch has no per-group look-up-table matmul, so the module dequantized the whole weight on
// every call (4.6 tok/s at batch 1). Here the grid of a group sits in a register and vpermps looks up 16
// codes at once; each thread walks a contiguous run of output rows, 4 at a time, with up to 4 inputs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FRUGALLM_MIX4_AVX512 1
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
  int64_t k, half, group, groups, sel_bytes;  // half = K/2 (bytes per row); sel_bytes = ceil(groups/4)
};

// out[r][m] = sum_k w[r][k] * x[m][k], rows <= 4 weight rows, MC inputs; CPG = group_size / 16 chunks of 16
// codes per group (0: read from the layout).
template <int MC, int CPG, typename S>
void dot_tile(const uint8_t* codes, const uint8_t* sel, const S* qscale, const float* grids, const Layout& l,
              const float* x, int64_t rows, float out[kRowsPerTile][kMaxRows]) {
#if defined(FRUGALLM_MIX4_AVX512)
  __m512 lut[4];
  for (int t = 0; t < 4; ++t) lut[t] = _mm512_loadu_ps(grids + 16 * t);
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const int64_t cpg = CPG > 0 ? CPG : l.group / 16;
  const int64_t half_groups = l.half / l.group;  // the high twin of group g is g + half_groups
  uint8_t sel_row[512];  // decoded selectors of one row (groups <= 512: checked by the caller)
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc_lo[MC], acc_hi[MC];  // two independent FMA chains per input
    for (int m = 0; m < MC; ++m) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
    const uint8_t* cr = codes + r * l.half;
    const S* qr = qscale + r * l.groups * 2;
    // Selectors are planar 2-bit codes: group g is plane g / sel_bytes of byte g % sel_bytes.
    for (int64_t plane = 0, g = 0; plane < 4; ++plane)
      for (int64_t byte = 0; byte < l.sel_bytes && g < l.groups; ++byte, ++g)
        sel_row[g] = (sel[r * l.sel_bytes + byte] >> (2 * plane)) & 3;
    for (int64_t g_lo = 0; g_lo < half_groups; ++g_lo) {  // one group of the low half and its high twin
      const int64_t g_hi = g_lo + half_groups, c0 = g_lo * l.group;
      const __m512 lut_lo = lut[sel_row[g_lo]], lut_hi = lut[sel_row[g_hi]];
      const __m512 s_lo = _mm512_set1_ps(to_float(qr[2 * g_lo])), o_lo = _mm512_set1_ps(to_float(qr[2 * g_lo + 1]));
      const __m512 s_hi = _mm512_set1_ps(to_float(qr[2 * g_hi])), o_hi = _mm512_set1_ps(to_float(qr[2 * g_hi + 1]));
      _mm_prefetch(reinterpret_cast<const char*>(cr + c0) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t i = c0 + 16 * j;
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + i));
        const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, low4));
        const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low4));
        const __m512 w_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, lut_lo), s_lo, o_lo);
        const __m512 w_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, lut_hi), s_hi, o_hi);
#pragma GCC unroll 4
        for (int m = 0; m < MC; ++m) {
          acc_lo[m] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + m * l.k + i), acc_lo[m]);
          acc_hi[m] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + m * l.k + l.half + i), acc_hi[m]);
        }
      }
    }
    for (int m = 0; m < MC; ++m) out[r][m] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[m], acc_hi[m]));
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    for (int m = 0; m < MC; ++m) out[r][m] = 0.0f;
    for (int64_t kk = 0; kk < l.k; ++kk) {
      const int64_t byte = kk < l.half ? kk : kk - l.half;
      const int code = kk < l.half ? codes[r * l.half + byte] & 15 : codes[r * l.half + byte] >> 4;
      const int64_t g = kk / l.group;
      const S* q = qscale + (r * l.groups + g) * 2;
      const int t = (sel[r * l.sel_bytes + g % l.sel_bytes] >> (2 * (g / l.sel_bytes))) & 3;
      const float w = grids[16 * t + code] * to_float(q[0]) + to_float(q[1]);
      for (int m = 0; m < MC; ++m) out[r][m] += w * x[m * l.k + kk];
    }
  }
#endif
}

template <typename S>
void run(const float* xf, int64_t rows, const uint8_t* codes, const uint8_t* sel, const S* qscale,
         const float* grids, const Layout& l, const float* bias, uint16_t* y, int64_t n) {
  using Tile = void (*)(const uint8_t*, const uint8_t*, const S*, const float*, const Layout&, const float*,
                        int64_t, float[kRowsPerTile][kMaxRows]);
  // [inputs - 1][group 32 / 64 / other]
  constexpr Tile tiles[kMaxRows][3] = {
      {&dot_tile<1, 2, S>, &dot_tile<1, 4, S>, &dot_tile<1, 0, S>},
      {&dot_tile<2, 2, S>, &dot_tile<2, 4, S>, &dot_tile<2, 0, S>},
      {&dot_tile<3, 2, S>, &dot_tile<3, 4, S>, &dot_tile<3, 0, S>},
      {&dot_tile<4, 2, S>, &dot_tile<4, 4, S>, &dot_tile<4, 0, S>},
  };
  const int gi = l.group == 32 ? 0 : l.group == 64 ? 1 : 2;
  frugallm::row_tiles<kRowsPerTile, kMaxRows>(
      n, rows, nullptr, bias, y, [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[kRowsPerTile][kMaxRows]) {
        tiles[mc - 1][gi](codes + n0 * l.half, sel + n0 * l.sel_bytes, qscale + n0 * l.groups * 2, grids, l,
                          xf + m0 * l.k, nr, out);
      });
}

// The checked layout of a mix4 weight with `k` input features (the ops' shared argument checks).
Layout checked_layout(const at::Tensor& qweight, const at::Tensor& sel, const at::Tensor& qscale,
                      const at::Tensor& grids, int64_t group_size, int64_t k) {
  const int64_t n = qweight.size(0);
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && k % 32 == 0 && (k / 2) % group_size == 0 &&
                  k / group_size <= 512,
              "mix4_linear needs group_size % 16 == 0, in_features/2 a multiple of group_size and <= 512 groups");
  const int64_t groups = k / group_size, sel_bytes = (groups + 3) / 4;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.size(1) == k / 2,
              "qweight must be a contiguous uint8 [out_features, in_features/2] tensor");
  TORCH_CHECK(sel.dim() == 2 && sel.scalar_type() == at::kByte && sel.is_contiguous() && sel.size(0) == n &&
                  sel.size(1) == sel_bytes,
              "selector must be a contiguous uint8 [out_features, ceil(groups/4)] tensor");
  TORCH_CHECK(qscale.dim() == 3 && qscale.is_contiguous() && qscale.size(0) == n && qscale.size(1) == groups &&
                  qscale.size(2) == 2,
              "qscale must be a contiguous [out_features, groups, 2] tensor");
  TORCH_CHECK(grids.scalar_type() == at::kFloat && grids.is_contiguous() && grids.numel() == 64,
              "grids must be a contiguous float32 [4, 16] tensor");
  return Layout{k, k / 2, group_size, groups, sel_bytes};
}

at::Tensor mix4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& sel,
                       const at::Tensor& qscale, const at::Tensor& grids, int64_t group_size,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  const int64_t rows = x.size(0), n = qweight.size(0);
  const Layout l = checked_layout(qweight, sel, qscale, grids, group_size, x.size(1));
  const float* b = frugallm::bias_ptr(bias, n);
  const std::vector<float> xf = frugallm::rows_as_float(x);
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint8_t* cp = qweight.data_ptr<uint8_t>();
  const uint8_t* sp = sel.data_ptr<uint8_t>();
  const float* gp = grids.data_ptr<float>();
  frugallm::with_param_type<false>(qscale, "qscale", [&](const auto* qs) { run(xf.data(), rows, cp, sp, qs, gp, l, b, yp, n); });
  return y;
}

// w = grid[sel][code] * scale + offset for the rows [begin, end) as bf16 (one fp32 FMA, one rounding).
template <typename S>
void dequantize_rows(const uint8_t* codes, const uint8_t* sel, const S* qscale, const float* grids, const Layout& l,
                     int64_t begin, int64_t end, uint16_t* w) {
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* cr = codes + r * l.half;
    const S* qr = qscale + r * l.groups * 2;
    uint16_t* out = w + r * l.k;
    for (int64_t g = 0; g < l.groups; ++g) {
      const int t = (sel[r * l.sel_bytes + g % l.sel_bytes] >> (2 * (g / l.sel_bytes))) & 3;
      const float scale = to_float(qr[2 * g]), offset = to_float(qr[2 * g + 1]);
      const bool high = g * l.group >= l.half;  // the high half's codes are the high nibbles
      const int64_t c0 = g * l.group, byte0 = high ? c0 - l.half : c0;
      int64_t j = 0;
#if defined(FRUGALLM_MIX4_AVX512) && defined(__AVX512BF16__)
      const __m512 lut = _mm512_loadu_ps(grids + 16 * t), s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
      const __m128i low4 = _mm_set1_epi8(0x0f);
      for (; j + 16 <= l.group; j += 16) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + byte0 + j));
        if (high) b = _mm_srli_epi16(b, 4);
        const __m512i code = _mm512_cvtepu8_epi32(_mm_and_si128(b, low4));
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_fmadd_ps(_mm512_permutexvar_ps(code, lut), s, o));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0 + j), (__m256i)v);
      }
#endif
      for (; j < l.group; ++j) {
        const uint8_t b = cr[byte0 + j];
        const int code = high ? b >> 4 : b & 15;
        out[c0 + j] = frugallm::float_to_bf16(grids[16 * t + code] * scale + offset);
      }
    }
  }
}

// The whole weight as bf16 [N, K]: passes of more than 16 rows (prefill) dequantize, then run a GEMM.
at::Tensor mix4_dequantize(const at::Tensor& qweight, const at::Tensor& sel, const at::Tensor& qscale,
                           const at::Tensor& grids, int64_t group_size, int64_t in_features) {
  const Layout l = checked_layout(qweight, sel, qscale, grids, group_size, in_features);
  const int64_t n = qweight.size(0);
  at::Tensor w = at::empty({n, in_features}, qweight.options().dtype(at::kBFloat16));
  auto* wp = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint8_t* cp = qweight.data_ptr<uint8_t>();
  const uint8_t* sp = sel.data_ptr<uint8_t>();
  const float* gp = grids.data_ptr<float>();
  frugallm::with_param_type<false>(qscale, "qscale", [&](const auto* qs) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { dequantize_rows(cp, sp, qs, gp, l, begin, end, wp); });
  });
  return w;
}

bool mix4_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("mix4_linear(Tensor x, Tensor qweight, Tensor selector, Tensor qscale, Tensor grids, int group_size, "
        "Tensor? bias) -> Tensor");
  m.def("mix4_dequantize(Tensor qweight, Tensor selector, Tensor qscale, Tensor grids, int group_size, "
        "int in_features) -> Tensor");
  m.def("mix4_linear_vectorized() -> bool", &mix4_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("mix4_linear", &mix4_linear);
  m.impl("mix4_dequantize", &mix4_dequantize);
}
