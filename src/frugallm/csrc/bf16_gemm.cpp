// requires: avx512bf16 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// bf16 linear for CPU decode steps: y[M, N] = x[M, K] @ W^T (+ bias) with W pre-packed in VNNI pairs,
// [ceil(N/16), K/2, 16, 2], so that one 64-byte load of W feeds one vdpbf16ps (16 outputs x 2 inputs, fp32
// accumulate) for every row of x. Registered as torch.ops.frugallm.bf16_linear.
//
// Why a kernel: decode multiplies a few rows by every weight of the model once per step, so the weights
// stream from DRAM. Each thread here walks a contiguous range of 16-column blocks, one sequential stream
// the hardware prefetcher follows, with up to 16 rows accumulating in registers; oneDNN's packed GEMM at
// 16 rows moves the same weights at about half the streaming bandwidth.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define FRUGALLM_DPBF16 1
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

namespace {

constexpr int64_t kCols = 16;  // output columns per packed block
constexpr int64_t kRows = 16;  // rows of x per register tile
constexpr int64_t kChunkRows = 64;  // rows per pass over the weight (their activations stay in L1/L2)
// Software prefetch distance into the weight stream: the hardware prefetcher alone leaves the loop
// waiting on DRAM (16 rows: 10.4 -> 5.6 ms over SmolLM2's matrices with 8 KiB; 0.5 KiB: 8.3, 2 KiB: 6.8).
constexpr int kPrefetchBytes = 8192;

#if defined(FRUGALLM_DPBF16)
// One 16-column block for ROWS (<= 16) rows: acc[m] += pair(x[m], k) . pair(W[:, k]) over K/2 pairs.
template <int ROWS>
inline void block_tile(const uint32_t* x, int64_t x_pairs, const __m512bh* w, int64_t pairs, const float* bias,
                       uint16_t* y, int64_t n_out, int64_t col0) {
  __m512 acc[ROWS];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(w + p) + kPrefetchBytes, _MM_HINT_T0);
    const __m512bh wv = w[p];
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m)
      // x's pair as an embedded {1to16} broadcast operand: a separate vpbroadcastd would take a vector
      // pipe slot per product and halve the rate (compilers do not fold it for this instruction).
      asm("vdpbf16ps %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc[m]) : [w] "v"(wv), [x] "m"(x[m * x_pairs + p]));
  }
  const int64_t valid = std::min<int64_t>(kCols, n_out - col0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + col0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) {
    const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m], b));
    _mm256_mask_storeu_epi16(y + m * n_out + col0, mask, (__m256i)out);
  }
}

using TileFn = void (*)(const uint32_t*, int64_t, const __m512bh*, int64_t, const float*, uint16_t*, int64_t,
                        int64_t);

template <int... R>
constexpr auto make_tiles(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&block_tile<R + 1>...};
}
constexpr auto kTiles = make_tiles(std::make_integer_sequence<int, kRows>{});
#endif

// Reference loops (CPUs without AVX512-BF16): the same arithmetic, fp32 accumulate, slow.
void block_generic(const uint16_t* x, int64_t k, const uint16_t* w, const float* bias, uint16_t* y, int64_t rows,
                   int64_t n_out, int64_t col0) {
  const int64_t pairs = k / 2;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < kCols && col0 + c < n_out; ++c) {
      float acc = 0.0f;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t i = 0; i < 2; ++i)
          acc += frugallm::bf16_to_float(x[m * k + 2 * p + i]) * frugallm::bf16_to_float(w[(p * kCols + c) * 2 + i]);
      if (bias != nullptr) acc += bias[col0 + c];
      y[m * n_out + col0 + c] = frugallm::float_to_bf16(acc);
    }
  }
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(2) == kCols &&
                  w.size(3) == 2,
              "w must be a contiguous bfloat16 [ceil(N/16), K/2, 16, 2] tensor (pack_bf16_vnni)");
  const int64_t rows = x.size(0), k = x.size(1), pairs = w.size(1), blocks = w.size(0);
  TORCH_CHECK(k == 2 * pairs, "x has ", k, " features but the packed weight ", 2 * pairs);
  TORCH_CHECK(n_out > 0 && (n_out + kCols - 1) / kCols == blocks, "out_features does not match the packed weight");
  const float* b = frugallm::bias_ptr(bias, n_out);
  at::Tensor y = at::empty({rows, n_out}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // Rows in chunks whose activations stay in cache across all column blocks; per chunk, each thread a
  // contiguous range of column blocks: one sequential stream through the packed weight.
  const int64_t chunk = kChunkRows;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const uint16_t* wb = wp + blk * pairs * kCols * 2;
        for (int64_t m0 = r0; m0 < r1; m0 += kRows) {
          const int64_t mc = std::min(kRows, r1 - m0);
#if defined(FRUGALLM_DPBF16)
          kTiles[mc - 1](reinterpret_cast<const uint32_t*>(xp + m0 * k), pairs,
                         reinterpret_cast<const __m512bh*>(wb), pairs, b, yp + m0 * n_out, n_out, blk * kCols);
#else
          block_generic(xp + m0 * k, k, wb, b, yp + m0 * n_out, mc, n_out, blk * kCols);
#endif
        }
      }
    });
  }
  return y;
}

bool bf16_gemm_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor");
  m.def("bf16_gemm_vectorized() -> bool", &bf16_gemm_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
