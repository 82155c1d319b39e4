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
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

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

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}
inline float to_float(c10::BFloat16 v) { return frugallm::bf16_to_float(v.x); }

struct Layout {
  int64_t k, group, groups, planes, plane_len, row_bytes;  // planes = V, plane_len = m, row_bytes = bytes * m
  int64_t params;                                          // 2: (scale, offset) per group; 1: symmetric
};

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
  const float sym_offset = -static_cast<float>(1 << (BITS - 1));
#if defined(FRUGALLM_LOWBIT_AVX512)
  __m512 acc[kRowsPerTile][MC];
  for (int r = 0; r < kRowsPerTile; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < l.groups; ++g) {
    __m512 s[kRowsPerTile], o[kRowsPerTile];
#pragma GCC unroll 4
    for (int r = 0; r < kRowsPerTile; ++r) {
      const S* q = qscale + (r * l.groups + g) * l.params;
      const float scale = r < rows ? to_float(q[0]) : 0.0f;
      s[r] = _mm512_set1_ps(scale);
      o[r] = _mm512_set1_ps(r >= rows ? 0.0f : l.params == 2 ? to_float(q[1]) : sym_offset * scale);
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
        const S* q = qscale + (r * l.groups + g) * l.params;
        const float scale = to_float(q[0]);
        const float offset = l.params == 2 ? to_float(q[1]) : sym_offset * scale;
        for (int64_t c = g * l.group; c < (g + 1) * l.group; ++c)
          acc += (codes[r * stride + c] * scale + offset) * x[m * l.k + c];
      }
      out[r][m] = acc;
    }
#endif
}

template <int BITS, typename S>
void run(const float* xf, int64_t rows, const uint8_t* qweight, const S* qscale, const Layout& l, const float* bias,
         uint16_t* y, int64_t n) {
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
void dispatch_bits(int64_t bits, const float* xf, int64_t rows, const uint8_t* qweight, const S* qscale,
                   const Layout& l, const float* bias, uint16_t* y, int64_t n) {
  switch (bits) {
    case 2: return run<2>(xf, rows, qweight, qscale, l, bias, y, n);
    case 3: return run<3>(xf, rows, qweight, qscale, l, bias, y, n);
    case 4: return run<4>(xf, rows, qweight, qscale, l, bias, y, n);
    case 6: return run<6>(xf, rows, qweight, qscale, l, bias, y, n);
    case 8: return run<8>(xf, rows, qweight, qscale, l, bias, y, n);
    default: TORCH_CHECK(false, "lowbit_linear supports 2, 3, 4, 6 and 8 bits, got ", bits);
  }
}

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qscale, int64_t bits,
                         int64_t group_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 [rows, in_features] tensor");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8,
              "lowbit_linear supports 2, 3, 4, 6 and 8 bits, got ", bits);
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && k % group_size == 0,
              "lowbit_linear needs group_size % 16 == 0 dividing in_features (", k, "), got ", group_size);
  const int64_t values = 8 / std::gcd<int64_t>(8, bits), nbytes = values * bits / 8;
  const int64_t plane_len = (k + values - 1) / values, groups = k / group_size;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.size(1) == plane_len * nbytes,
              "qweight must be a contiguous uint8 [out_features, ", plane_len * nbytes, "] tensor of packed ", bits,
              "-bit codes");
  const int64_t n = qweight.size(0);
  TORCH_CHECK(qscale.dim() == 3 && qscale.is_contiguous() && qscale.size(0) == n && qscale.size(1) == groups &&
                  (qscale.size(2) == 1 || qscale.size(2) == 2),
              "qscale must be a contiguous [out_features, ", groups, ", 1 or 2] tensor");
  const float* b = frugallm::bias_ptr(bias, n);
  const std::vector<float> xf = frugallm::rows_as_float(x);
  at::Tensor y = at::empty({rows, n}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const Layout l{k, group_size, groups, values, plane_len, plane_len * nbytes, qscale.size(2)};
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  switch (qscale.scalar_type()) {
    case at::kFloat:
      dispatch_bits(bits, xf.data(), rows, qp, qscale.data_ptr<float>(), l, b, yp, n);
      break;
    case at::kHalf:
      dispatch_bits(bits, xf.data(), rows, qp, qscale.data_ptr<c10::Half>(), l, b, yp, n);
      break;
    case at::kBFloat16:
      dispatch_bits(bits, xf.data(), rows, qp, qscale.data_ptr<c10::BFloat16>(), l, b, yp, n);
      break;
    default:
      TORCH_CHECK(false, "qscale must be float32, float16 or bfloat16, got ", qscale.scalar_type());
  }
  return y;
}

bool lowbit_linear_vectorized() { return kVectorized; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("lowbit_linear(Tensor x, Tensor qweight, Tensor qscale, int bits, int group_size, Tensor? bias) -> Tensor");
  m.def("lowbit_linear_vectorized() -> bool", &lowbit_linear_vectorized);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("lowbit_linear", &lowbit_linear); }
