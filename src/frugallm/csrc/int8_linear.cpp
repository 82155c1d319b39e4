// requires: avx512bf16 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Weight-only int8 linear for a few rows (decode): y[M, N] = (x[M, K] @ Q^T) * scales (+ bias), reading the
// int8 weight Q [N, K] in its stored row-major layout (no second copy). Registered as
// torch.ops.frugallm.int8_linear.
//
// Why a kernel: torch._weight_int8pack_mm moves SmolLM2's int8 weights at ~21 GB/s for one row. Here each
// thread walks a contiguous run of output rows, 4 at a time (4 * K contiguous bytes), widening 16 codes to
// fp32 per FMA against the fp32 copy of x, with a software prefetch ahead in that stream. From 5 inputs (batched
// decode) a row's codes are converted to bf16 once and meet up to 16 inputs in vdpbf16ps (AVX512-BF16).
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

#if defined(FRUGALLM_INT8_AVX512) && defined(__AVX512BF16__)
#define FRUGALLM_INT8_BF16 1
constexpr int64_t kBatchInputs = 16;  // batched tile: one weight row x 16 inputs = 16 accumulators

// Batched (5-16 inputs): out[0][m] = sum_k q[k] * x[m][k] for one weight row and MC <= 16 inputs. Each 32 codes
// are converted once to bf16 (int8 is exact in bf16) and meet every input in one vdpbf16ps on x as stored. One
// row per tile keeps that conversion (shuffle-port bound) to once per pass: 2 rows x 8 inputs, which halves the
// loads of x but converts twice, measured 1.4x slower, and so did one transpose-add tree for the 16 sums.
template <int MC>
void dot_row_bf16(const int8_t* q, int64_t k, const uint16_t* x, int64_t, float out[1][kBatchInputs]) {
  __m512 acc[MC];
#pragma GCC unroll 16
  for (int i = 0; i < MC; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const int64_t n = std::min<int64_t>(32, k - i);
    const __mmask32 mask = n == 32 ? ~0u : (1u << n) - 1u;
    _mm_prefetch(reinterpret_cast<const char*>(q + i) + kPrefetchBytes, _MM_HINT_T0);
    const __m256i codes = _mm256_maskz_loadu_epi8(mask, q + i);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1)));
    const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);
#pragma GCC unroll 16
    for (int m = 0; m < MC; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * k + i));
  }
#pragma GCC unroll 16
  for (int m = 0; m < MC; ++m) out[0][m] = _mm512_reduce_add_ps(acc[m]);
}

using BatchTileFn = void (*)(const int8_t*, int64_t, const uint16_t*, int64_t, float[1][kBatchInputs]);
constexpr BatchTileFn kBatchTiles[kBatchInputs] = {
    &dot_row_bf16<1>,  &dot_row_bf16<2>,  &dot_row_bf16<3>,  &dot_row_bf16<4>,  &dot_row_bf16<5>,  &dot_row_bf16<6>,
    &dot_row_bf16<7>,  &dot_row_bf16<8>,  &dot_row_bf16<9>,  &dot_row_bf16<10>, &dot_row_bf16<11>, &dot_row_bf16<12>,
    &dot_row_bf16<13>, &dot_row_bf16<14>, &dot_row_bf16<15>, &dot_row_bf16<16>};
#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias) {
  frugallm::check_int8_linear(x, q, scales);
  const int64_t rows = x.size(0), k = x.size(1), n = q.size(0);
  const float* b = frugallm::bias_ptr(bias, n);
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
#if defined(FRUGALLM_INT8_BF16)
  if (rows > kMaxRows) {
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    frugallm::row_tiles<1, kBatchInputs>(
        n, rows, sp, b, yp, [&](int64_t n0, int64_t nr, int64_t m0, int64_t mc, float out[1][kBatchInputs]) {
          kBatchTiles[mc - 1](qp + n0 * k, k, xb + m0 * k, nr, out);
        });
    return y;
  }
#endif
  // x in fp32 once: every weight tile reads it from cache.
  const std::vector<float> xf = frugallm::rows_as_float(x);
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
