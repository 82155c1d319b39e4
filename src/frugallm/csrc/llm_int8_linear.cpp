// requires: avx512bf16 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// LLM.int8() (Dettmers et al. 2022) for a few rows (decode), absmax variant: y = (Xq @ Wq^T) * sx * sw + X[:, O]
// @ (Wq[:, O] * sw)^T, where O are the input columns whose |x| exceeds the threshold in any row, Xq the regular
// columns rounded per row to int8 (round(x / sx), sx = absmax / 127) and Wq the stored int8 weight [N, K] with
// per-row scales sw. Registered as torch.ops.frugallm.llm_int8_linear; quant/llm_int8.py LLMInt8Linear has the
// same arithmetic in torch ops, and this kernel follows it operation for operation (the int8 products are exact,
// only the outlier columns' float sum may round in another order).
//
// Why a kernel: the torch path is ~15 small ops per linear (outlier search, row absmax, rounding, _int_mm,
// rescaling), ~60 us each at batch 1, which made LLM.int8() the slowest int8 method (TPOT 11 ms). Here the
// activation side is one pass over x, and the int8 x int8 products run on AVX512-VNNI vpdpbusd (64 per
// instruction): x is stored as u8 = xq + 128 and the bias comes back as 128 * sum_k Wq[n, k] (cached per module).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FRUGALLM_LLM_INT8_VNNI 1
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

constexpr int64_t kRowsPerTile = 4;  // weight rows sharing each load of x
constexpr int64_t kMaxInputs = 4;    // inputs per pass (accumulators: 4 x 4 zmm)
constexpr int kPrefetchBytes = 8192;

// acc[r][m] = sum_k u8[m][k] * q[r][k] (int32, exact) for `rows` (<= 4) weight rows and MC inputs; u8 rows are
// padded with zeros to a multiple of 64.
template <int MC>
void dot_tile(const int8_t* q, int64_t k, const uint8_t* u8, int64_t stride, int64_t rows,
              int32_t acc_out[kRowsPerTile][kMaxInputs]) {
#if defined(FRUGALLM_LLM_INT8_VNNI)
  __m512i acc[kRowsPerTile][MC];
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 64) {
    const __mmask64 mask = k - i >= 64 ? ~0ull : (1ull << (k - i)) - 1ull;
    __m512i xv[MC];
#pragma GCC unroll 4
    for (int m = 0; m < MC; ++m) xv[m] = _mm512_loadu_si512(u8 + m * stride + i);
#pragma GCC unroll 4
    for (int r = 0; r < kRowsPerTile; ++r) {
      if (r >= rows) break;
      const int8_t* qr = q + r * k + i;
      _mm_prefetch(reinterpret_cast<const char*>(qr) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i w = _mm512_maskz_loadu_epi8(mask, qr);
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], xv[m], w);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MC; ++m) acc_out[r][m] = _mm512_reduce_add_epi32(acc[r][m]);
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MC; ++m) {
      int32_t acc = 0;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(u8[m * stride + i]) * q[r * k + i];
      acc_out[r][m] = acc;
    }
#endif
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int32_t[kRowsPerTile][kMaxInputs]);
constexpr TileFn kTiles[kMaxInputs] = {&dot_tile<1>, &dot_tile<2>, &dot_tile<3>, &dot_tile<4>};

at::Tensor llm_int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                           const at::Tensor& rowsum, double threshold) {
  frugallm::check_int8_linear(x, q, scales);
  const int64_t rows = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(rowsum.scalar_type() == at::kInt && rowsum.is_contiguous() && rowsum.numel() == n,
              "rowsum must be a contiguous int32 [out_features] tensor (sum of each weight row)");
  TORCH_CHECK(threshold > 0, "threshold must be > 0, got ", threshold);
  const float thr = static_cast<float>(threshold);
  const std::vector<float> xf = frugallm::rows_as_float(x);

  // Outlier columns: |x| > threshold in any row (the torch path's `(x.abs() > t).any(0)`).
  std::vector<int64_t> outliers;
  for (int64_t c = 0; c < k; ++c)
    for (int64_t m = 0; m < rows; ++m)
      if (std::fabs(xf[m * k + c]) > thr) {
        outliers.push_back(c);
        break;
      }
  std::vector<uint8_t> is_outlier(k, 0);
  for (int64_t c : outliers) is_outlier[c] = 1;

  // Rows of the regular columns: sx = max(absmax, 1e-12) / 127, u8 = round(x / sx) + 128 (outliers: xq = 0).
  const int64_t stride = (k + 63) / 64 * 64;
  std::vector<uint8_t> u8(rows * stride, 0);
  std::vector<float> sx(rows);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = xf.data() + m * k;
    float amax = 0.0f;
    for (int64_t c = 0; c < k; ++c)
      if (!is_outlier[c]) amax = std::max(amax, std::fabs(xr[c]));
    sx[m] = std::max(amax, 1e-12f) / 127.0f;
    for (int64_t c = 0; c < k; ++c) {
      const float v = is_outlier[c] ? 0.0f : std::clamp(std::nearbyint(xr[c] / sx[m]), -127.0f, 127.0f);
      u8[m * stride + c] = static_cast<uint8_t>(static_cast<int32_t>(v) + 128);
    }
  }

  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const int32_t* rs = rowsum.data_ptr<int32_t>();
  frugallm::row_tiles<kRowsPerTile, kMaxInputs>(
      n, rows, nullptr, nullptr, yp,
      [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[kRowsPerTile][kMaxInputs]) {
        int32_t acc[kRowsPerTile][kMaxInputs];
        kTiles[mc - 1](qp + n0 * k, k, u8.data() + m0 * stride, stride, nr, acc);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t row = n0 + r;
          for (int64_t m = 0; m < mc; ++m) {
            float v = static_cast<float>(acc[r][m] - 128 * rs[row]) * sx[m0 + m] * sp[row];
            float extra = 0.0f;  // outlier columns: full-precision x times the dequantized weight
            for (int64_t c : outliers)
              extra += xf[(m0 + m) * k + c] * (static_cast<float>(qp[row * k + c]) * sp[row]);
            out[r][m] = v + extra;
          }
        }
      });
  return y;
}

bool llm_int8_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("llm_int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor rowsum, float threshold) -> Tensor");
  m.def("llm_int8_linear_vectorized() -> bool", &llm_int8_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("llm_int8_linear", &llm_int8_linear); }
