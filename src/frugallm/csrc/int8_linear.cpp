// Weight-only int8 linear for a few rows (decode): y[M, N] = (x[M, K] @ Q^T) * scales (+ bias), reading the
// int8 weight Q [N, K] in its stored row-major layout (no second copy). Registered as
// torch.ops.frugallm.int8_linear.
//
// Why a kernel: torch._weight_int8pack_mm moves SmolLM2's int8 weights at ~21 GB/s for one row. Here each
// thread walks a contiguous run of output rows, 4 at a time (4 * K contiguous bytes), widening 16 codes to
// fp32 per FMA against the fp32 copy of x, with a software prefetch ahead in that stream.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FRUGALLM_INT8_AVX512 1
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

constexpr int64_t kRowsPerTile = 4;  // output rows sharing each load of x
constexpr int64_t kMaxRows = 4;      // rows of x per pass (accumulators: 4 x 4 zmm)
constexpr int kPrefetchBytes = 8192;

// out[r][m] = sum_k q[r][k] * x[m][k] for `rows` (<= 4) weight rows and MC (<= 4) inputs.
template <int MC>
void dot_tile(const int8_t* q, int64_t k, const float* x, int64_t rows, float out[kRowsPerTile][kMaxRows]) {
#if defined(FRUGALLM_INT8_AVX512)
  if (rows == kRowsPerTile) {
    __m512 acc[kRowsPerTile][MC];
#pragma GCC unroll 4
    for (int r = 0; r < kRowsPerTile; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mask =
          k - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (k - i)) - 1u);
      __m512 xv[MC];
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * k + i);
#pragma GCC unroll 4
      for (int r = 0; r < kRowsPerTile; ++r) {
        const int8_t* qr = q + r * k + i;
        _mm_prefetch(reinterpret_cast<const char*>(qr) + kPrefetchBytes, _MM_HINT_T0);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, qr)));
#pragma GCC unroll 4
        for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRowsPerTile; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MC; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MC; ++m) {
      float acc = 0.0f;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(q[r * k + i]) * x[m * k + i];
      out[r][m] = acc;
    }
}

using TileFn = void (*)(const int8_t*, int64_t, const float*, int64_t, float[kRowsPerTile][kMaxRows]);
constexpr TileFn kTiles[kMaxRows] = {&dot_tile<1>, &dot_tile<2>, &dot_tile<3>, &dot_tile<4>};

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "qweight must be a contiguous int8 [out_features, in_features] tensor");
  const int64_t rows = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(q.size(1) == k, "x has ", k, " features but the weight ", q.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n,
              "scales must be a contiguous float32 [out_features] tensor");
  const float* b = frugallm::bias_ptr(bias, n);
  // x in fp32 once: every weight tile reads it from cache.
  const std::vector<float> xf = frugallm::rows_as_float(x);
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  frugallm::row_tiles<kRowsPerTile, kMaxRows>(
      n, rows, sp, b, yp, [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[kRowsPerTile][kMaxRows]) {
        kTiles[mc - 1](qp + n0 * k, k, xf.data() + m0 * k, nr, out);
      });
  return y;
}

bool int8_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int8_linear_vectorized() -> bool", &int8_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("int8_linear", &int8_linear); }
