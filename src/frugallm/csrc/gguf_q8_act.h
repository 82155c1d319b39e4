// Activations quantized to int8 per 32 values (weights="stored-q8"; llama.cpp's arithmetic, NOT exact), shared by
// csrc/gguf_q8.cpp (stored blocks) and csrc/gguf_x16.cpp (x16b layouts) so both see the same codes and scales.
// Per block of 32 values (the Python reference quant/gguf_linear.py q8_quantize repeats it operation for operation):
// amax = max |x|, dx = amax / 127 (fp32), inv = dx != 0 ? 1 / dx : 0, qx = round-half-to-even(x * inv) (the CPU's
// default rounding mode, as _mm256_cvtps_epi32 and nearbyint use), clamped to [-127, 127].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace frugallm::q8act {

// Activations quantized per 32 values, for `rows` input rows of k values.
struct QuantizedX {
  int64_t k = 0, nc = 0;   // values per row, chunks (of 32) per row
  std::vector<int8_t> q;   // [rows, k] codes
  std::vector<float> d;    // [rows, nc] scales
  std::vector<float> s16;  // [rows, 2 nc] d * (sum of the codes over each 16 values)
  std::vector<float> s32;  // [rows, nc]   d * (sum over each 32)
};

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const uint16_t* p) {  // bf16 -> fp32 (exact)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One row of k values (fp32 or bf16 bits) -> codes, scales and sums (see QuantizedX).
template <typename In>
inline void quantize_row(const In* x, int64_t k, int8_t* q, float* d, float* s16, float* s32) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t c = 0; c < k / 32; ++c) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8f(x + 32 * c + 8 * i);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float dx = hmax(a) / 127.0f;
    const __m256 inv = _mm256_set1_ps(dx != 0.0f ? 1.0f / dx : 0.0f);
    __m256i iv[4];
    for (int i = 0; i < 4; ++i) {  // the MXCSR's default mode: nearest, ties to even
      iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      iv[i] = _mm256_max_epi32(_mm256_min_epi32(iv[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    }
    const int32_t lo = hsum_i32(_mm256_add_epi32(iv[0], iv[1])), hi = hsum_i32(_mm256_add_epi32(iv[2], iv[3]));
    // int32 -> int8 keeping the order: the packs interleave 128-bit lanes, a dword permute undoes it.
    const __m256i p16a = _mm256_packs_epi32(iv[0], iv[1]), p16b = _mm256_packs_epi32(iv[2], iv[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * c), p8);
    d[c] = dx;
    s16[2 * c] = dx * static_cast<float>(lo);
    s16[2 * c + 1] = dx * static_cast<float>(hi);
    s32[c] = dx * static_cast<float>(lo + hi);
  }
}

// x [rows, K] float32 | bfloat16, contiguous, K % 32 == 0 (the callers check) -> its QuantizedX.
inline QuantizedX quantize_x(const at::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  QuantizedX xq;
  xq.k = k;
  xq.nc = k / 32;
  xq.q.resize(rows * k);
  xq.d.resize(rows * xq.nc);
  xq.s16.resize(rows * 2 * xq.nc);
  xq.s32.resize(rows * xq.nc);
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* q = xq.q.data() + r * k;
    float *d = xq.d.data() + r * xq.nc, *s16 = xq.s16.data() + r * 2 * xq.nc, *s32 = xq.s32.data() + r * xq.nc;
    if (bf16)
      quantize_row(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + r * k, k, q, d, s16, s32);
    else
      quantize_row(x.data_ptr<float>() + r * k, k, q, d, s16, s32);
  }
  return xq;
}

}  // namespace frugallm::q8act
#endif
