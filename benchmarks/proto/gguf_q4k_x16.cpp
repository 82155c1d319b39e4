// PROTOTYPE (not built by frugallm.native; benchmarks/proto/q4k_x16_bench.py builds and times it): Q4_K weights
// repacked at load time with 16 weight rows interleaved, so that vdpbf16ps lanes are output columns (the layout of
// llama.cpp's repacked ggml-cpu types and of oneDNN's packed GEMM weights). Each lane accumulates its own column:
// no horizontal sums, the scale FMA is once per 32 values for 16 columns, each x pair is one broadcast shared by the
// 16 columns, and each decoded weight vector is shared by every input row. The arithmetic of an output does not
// depend on how many rows run together (same kernel at every row count): a verify pass stays bit-identical to
// one-row decode.
//
// Layout, per group of 16 weight rows, per 256-value block, per 32-value sub-block j (384 bytes):
//   scale[16] fp32 (d * sc per column), offset[16] fp32 (dmin * m + 128 d sc: codes are read as bf16 128 + q),
//   4 x 64 bytes of nibbles: in 64-byte run z, column c's dword holds in 16-bit half s, field r (bits 4r..4r+3),
//   the code of value 32 j + 8 z + 2 r + s.
//   gguf_q4k_x16(x [rows, K] bf16, w uint8 [N / 16, K / 256 * 8 * 384], N) -> [rows, N] bf16
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kSub = 384;  // bytes per (16 columns, 32-value sub-block)
constexpr int64_t kRows = 8;  // input rows per pass over a group's weights

template <int MC>
void group_dot(const uint8_t* w, int64_t nsub, const uint16_t* x, int64_t k, const float* xs32, uint16_t* y,
               int64_t n_out) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  __m512 t[MC], off[MC];
  for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nsub; ++j) {
    const uint8_t* base = w + j * kSub;
    const __m512 sc = _mm512_loadu_ps(base);
    __m512 a0[MC], a1[MC];
    for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int z = 0; z < 4; ++z) {
      const __m512i d = _mm512_loadu_si512(base + 128 + 64 * z);
      const __m512bh v0 = (__m512bh)_mm512_ternarylogic_epi32(d, nib, magic, 0xEA);
      const __m512bh v1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), nib, magic, 0xEA);
      const __m512bh v2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 8), nib, magic, 0xEA);
      const __m512bh v3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 12), nib, magic, 0xEA);
      for (int m = 0; m < MC; ++m) {
        const float* xm = reinterpret_cast<const float*>(x + m * k + 32 * j + 8 * z);  // bf16 pairs as dwords
        a0[m] = _mm512_dpbf16_ps(a0[m], v0, (__m512bh)_mm512_set1_ps(xm[0]));  // vbroadcastss from memory
        a1[m] = _mm512_dpbf16_ps(a1[m], v1, (__m512bh)_mm512_set1_ps(xm[1]));
        a0[m] = _mm512_dpbf16_ps(a0[m], v2, (__m512bh)_mm512_set1_ps(xm[2]));
        a1[m] = _mm512_dpbf16_ps(a1[m], v3, (__m512bh)_mm512_set1_ps(xm[3]));
      }
    }
    for (int m = 0; m < MC; ++m) t[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[m], a1[m]), sc, t[m]);
  }
  for (int64_t j = 0; j < nsub; ++j) {
    const __m512 mn = _mm512_loadu_ps(w + j * kSub + 64);
    for (int m = 0; m < MC; ++m) off[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs32[m * (k / 32) + j]), off[m]);
  }
  for (int m = 0; m < MC; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n_out), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(t[m], off[m])));
}

at::Tensor gguf_q4k_x16(const at::Tensor& x, const at::Tensor& w, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: contiguous bf16 [rows, K]");
  const int64_t rows = x.size(0), k = x.size(1), nsub = k / 32;
  TORCH_CHECK(k % 256 == 0 && n_out % 16 == 0, "K % 256 and N % 16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == n_out / 16 * nsub * kSub, "w size");
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<float> xs32(rows * nsub);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < nsub; ++j) {
      float s16[2] = {0.0f, 0.0f};
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 16; ++i) {
          uint32_t u = static_cast<uint32_t>(xb[m * k + 32 * j + 16 * h + i]) << 16;
          float f;
          std::memcpy(&f, &u, 4);
          s16[h] += f;
        }
      xs32[m * nsub + j] = s16[0] + s16[1];
    }
  at::Tensor y = at::empty({rows, n_out}, x.options());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n_out / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
        const int64_t mc = std::min<int64_t>(kRows, rows - m0);
        const uint8_t* wg = wp + g * nsub * kSub;
        const uint16_t* xm = xb + m0 * k;
        const float* s = xs32.data() + m0 * nsub;
        uint16_t* ym = yb + m0 * n_out + 16 * g;
        switch (mc) {
          case 1: group_dot<1>(wg, nsub, xm, k, s, ym, n_out); break;
          case 2: group_dot<2>(wg, nsub, xm, k, s, ym, n_out); break;
          case 3: group_dot<3>(wg, nsub, xm, k, s, ym, n_out); break;
          case 4: group_dot<4>(wg, nsub, xm, k, s, ym, n_out); break;
          case 5: group_dot<5>(wg, nsub, xm, k, s, ym, n_out); break;
          case 6: group_dot<6>(wg, nsub, xm, k, s, ym, n_out); break;
          case 7: group_dot<7>(wg, nsub, xm, k, s, ym, n_out); break;
          default: group_dot<8>(wg, nsub, xm, k, s, ym, n_out); break;
        }
      }
  });
  return y;
}

// Same-size layout (the file's 144 bytes per row per block, so repacking costs no memory): per group of 16 rows, per
// block (2304 bytes): d[16] fp16, dmin[16] fp16, the 12 packed scale bytes as [12][16] (byte i of column c at
// 16 i + c), then the nibbles of sub-blocks 0-7 in the layout above (256 bytes each). Scales are decoded for 16
// columns at once: d * sc and dmin * m + 128 d sc per sub-block, the fp32 products the reference computes.
constexpr int kBlock2 = 2304;

template <int MC>
void group_dot2(const uint8_t* w, int64_t nblocks, const uint16_t* x, int64_t k, const float* xs32, uint16_t* y,
                int64_t n_out) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  const __m512i m63 = _mm512_set1_epi32(63), m15 = _mm512_set1_epi32(15);
  __m512 t[MC], off[MC];
  for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * kBlock2;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    const __m512 dmv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
    __m512i sb[12];
    for (int i = 0; i < 12; ++i) sb[i] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 + 16 * i)));
    for (int j = 0; j < 8; ++j) {
      __m512i sc, mn;
      if (j < 4) {
        sc = _mm512_and_si512(sb[j], m63);
        mn = _mm512_and_si512(sb[j + 4], m63);
      } else {
        sc = _mm512_or_si512(_mm512_and_si512(sb[j + 4], m15), _mm512_slli_epi32(_mm512_srli_epi32(sb[j - 4], 6), 4));
        mn = _mm512_or_si512(_mm512_srli_epi32(sb[j + 4], 4), _mm512_slli_epi32(_mm512_srli_epi32(sb[j], 6), 4));
      }
      const __m512 scale = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
      const __m512 mnv = _mm512_fmadd_ps(_mm512_set1_ps(128.0f), scale, _mm512_mul_ps(dmv, _mm512_cvtepi32_ps(mn)));
      const uint8_t* q = b + 256 + 256 * j;
      __m512 a0[MC], a1[MC];
      for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int z = 0; z < 4; ++z) {
        const __m512i d = _mm512_loadu_si512(q + 64 * z);
        const __m512bh v0 = (__m512bh)_mm512_ternarylogic_epi32(d, nib, magic, 0xEA);
        const __m512bh v1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), nib, magic, 0xEA);
        const __m512bh v2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 8), nib, magic, 0xEA);
        const __m512bh v3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 12), nib, magic, 0xEA);
        for (int m = 0; m < MC; ++m) {
          const float* xm = reinterpret_cast<const float*>(x + m * k + 256 * blk + 32 * j + 8 * z);
          a0[m] = _mm512_dpbf16_ps(a0[m], v0, (__m512bh)_mm512_set1_ps(xm[0]));
          a1[m] = _mm512_dpbf16_ps(a1[m], v1, (__m512bh)_mm512_set1_ps(xm[1]));
          a0[m] = _mm512_dpbf16_ps(a0[m], v2, (__m512bh)_mm512_set1_ps(xm[2]));
          a1[m] = _mm512_dpbf16_ps(a1[m], v3, (__m512bh)_mm512_set1_ps(xm[3]));
        }
      }
      for (int m = 0; m < MC; ++m) {
        t[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[m], a1[m]), scale, t[m]);
        off[m] = _mm512_fmadd_ps(mnv, _mm512_set1_ps(xs32[m * (k / 32) + 8 * blk + j]), off[m]);
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n_out), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(t[m], off[m])));
}

at::Tensor gguf_q4k_x16b(const at::Tensor& x, const at::Tensor& w, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: contiguous bf16 [rows, K]");
  const int64_t rows = x.size(0), k = x.size(1), nsub = k / 32, nblocks = k / 256;
  TORCH_CHECK(k % 256 == 0 && n_out % 16 == 0, "K % 256 and N % 16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == n_out / 16 * nblocks * kBlock2, "w size");
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<float> xs32(rows * nsub);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < nsub; ++j) {
      float s16[2] = {0.0f, 0.0f};
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 16; ++i) {
          uint32_t u = static_cast<uint32_t>(xb[m * k + 32 * j + 16 * h + i]) << 16;
          float f;
          std::memcpy(&f, &u, 4);
          s16[h] += f;
        }
      xs32[m * nsub + j] = s16[0] + s16[1];
    }
  at::Tensor y = at::empty({rows, n_out}, x.options());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  constexpr int64_t kRows2 = 4;
  at::parallel_for(0, n_out / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += kRows2) {
        const int64_t mc = std::min<int64_t>(kRows2, rows - m0);
        const uint8_t* wg = wp + g * nblocks * kBlock2;
        const uint16_t* xm = xb + m0 * k;
        const float* s = xs32.data() + m0 * nsub;
        uint16_t* ym = yb + m0 * n_out + 16 * g;
        switch (mc) {
          case 1: group_dot2<1>(wg, nblocks, xm, k, s, ym, n_out); break;
          case 2: group_dot2<2>(wg, nblocks, xm, k, s, ym, n_out); break;
          case 3: group_dot2<3>(wg, nblocks, xm, k, s, ym, n_out); break;
          default: group_dot2<4>(wg, nblocks, xm, k, s, ym, n_out); break;
        }
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gguf_x16, m) {
  m.def("gguf_q4k_x16(Tensor x, Tensor w, int n_out) -> Tensor");
  m.def("gguf_q4k_x16b(Tensor x, Tensor w, int n_out) -> Tensor");
}
TORCH_LIBRARY_IMPL(gguf_x16, CPU, m) {
  m.impl("gguf_q4k_x16", &gguf_q4k_x16);
  m.impl("gguf_q4k_x16b", &gguf_q4k_x16b);
}
