// Helpers shared by frugallm's native CPU kernels (each .cpp is its own library; see frugallm/native.py).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace frugallm {

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Scales and offsets, read as float whatever their stored type.
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}
inline float to_float(c10::BFloat16 v) { return bf16_to_float(v.x); }

// fn(data) with the tensor's data typed as float (with AllowFloat), c10::Half or c10::BFloat16; any other dtype
// is a clear error naming the tensor.
template <bool AllowFloat, typename Fn>
void with_param_type(const at::Tensor& t, const char* name, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat:
      if constexpr (AllowFloat) return fn(t.data_ptr<float>());
      break;
    case at::kHalf:
      return fn(t.data_ptr<c10::Half>());
    case at::kBFloat16:
      return fn(t.data_ptr<c10::BFloat16>());
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be ", AllowFloat ? "float32, " : "", "float16 or bfloat16, got ", t.scalar_type());
}

// x bf16 [rows, K] against an int8 weight [N, K] with float32 per-row scales [N] (the int8 linears' operands).
inline void check_int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "qweight must be a contiguous int8 [out_features, in_features] tensor");
  TORCH_CHECK(q.size(1) == x.size(1), "x has ", x.size(1), " features but the weight ", q.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == q.size(0),
              "scales must be a contiguous float32 [out_features] tensor");
}

// The bias of a linear as a float32 pointer (nullptr for none), checked against out_features.
inline const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t out_features) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features,
              "bias must be a contiguous float32 [out_features] tensor");
  return bias->data_ptr<float>();
}

// A contiguous bfloat16 [rows, k] activation as float32, row-major (kernels that FMA in fp32 read it from
// cache for every weight tile).
inline std::vector<float> rows_as_float(const at::Tensor& x) {
  std::vector<float> out(x.numel());
  const auto* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(p[i]);
  return out;
}

// Drives a row-tiled GEMV-like kernel: output rows in tiles of R, inputs in chunks of M. tile(n0, nr, m0, mc,
// out) fills out[r][m] = row n0 + r of W . input m0 + m (r < nr <= R, m < mc <= M); y[m][n] = out (+ scale[n])
// (+ bias[n]) as bf16. Each thread takes a contiguous run of tiles: one sequential stream through W.
template <int64_t R, int64_t M, typename Tile>
void row_tiles(int64_t n_out, int64_t rows, const float* scale, const float* bias, uint16_t* y, Tile&& tile) {
  const int64_t tiles = (n_out + R - 1) / R;
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    float out[R][M];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * R, nr = std::min(R, n_out - n0);
      for (int64_t m0 = 0; m0 < rows; m0 += M) {
        const int64_t mc = std::min(M, rows - m0);
        tile(n0, nr, m0, mc, out);
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t m = 0; m < mc; ++m) {
            float v = out[r][m];
            if (scale != nullptr) v *= scale[n0 + r];
            if (bias != nullptr) v += bias[n0 + r];
            y[(m0 + m) * n_out + n0 + r] = float_to_bf16(v);
          }
      }
    }
  });
}

// exp(x) for x <= 0 (scores minus their max): Cephes' expf polynomial on the reduced argument, written
// without branches so the loop vectorizes (relative error ~2e-7; scalar libm expf would dominate the
// attention kernels: S * heads calls per layer).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace frugallm
