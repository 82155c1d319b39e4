// PROTOTYPE (not built by frugallm.native; benchmarks/proto/q4k_x16_bench.py --fly builds and times it): the
// column-interleaved Q4_K product of gguf_q4k_x16.cpp on the blocks AS STORED (no repack, no extra memory): per
// group of 16 weight rows, each dword of their nibbles is gathered across the 16 rows (vpgatherdd), so vdpbf16ps
// lanes are output columns; a dword's 4 bytes hold values v, v+1, v+2, v+3 of sub-blocks j (low nibbles) and j + 1
// (high), so x is permuted once per call to pairs (v, v + 2), (v + 1, v + 3). Same arithmetic at every row count.
//   gguf_q4k_fly(x [rows, K] bf16, w uint8 [N, K / 256 * 144] (N % 16 == 0), N) -> [rows, N] bf16
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <int MC>
void group_fly(const uint8_t* w, int64_t row_bytes, int64_t nblocks, const uint16_t* xq, int64_t k, const float* xs32,
               uint16_t* y, int64_t n_out) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  const __m512i m63 = _mm512_set1_epi32(63), m15 = _mm512_set1_epi32(15), mff = _mm512_set1_epi32(0xFF);
  const __m512i vidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(row_bytes)));
  __m512 t[MC], off[MC];
  for (int m = 0; m < MC; ++m) t[m] = off[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint8_t* b = w + blk * 144;
    const __m512i dw = _mm512_i32gather_epi32(vidx, b, 1);
    const __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw));
    const __m512 dmv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dw, 16)));
    const __m512i s4[3] = {_mm512_i32gather_epi32(vidx, b + 4, 1), _mm512_i32gather_epi32(vidx, b + 8, 1),
                           _mm512_i32gather_epi32(vidx, b + 12, 1)};
    auto sbyte = [&](int i) { return _mm512_and_si512(_mm512_srli_epi32(s4[i / 4], 8 * (i % 4)), mff); };
    __m512 scale[8], mnp[8];
    for (int j = 0; j < 8; ++j) {
      __m512i sc, mn;
      if (j < 4) {
        sc = _mm512_and_si512(sbyte(j), m63);
        mn = _mm512_and_si512(sbyte(j + 4), m63);
      } else {
        sc = _mm512_or_si512(_mm512_and_si512(sbyte(j + 4), m15), _mm512_slli_epi32(_mm512_srli_epi32(sbyte(j - 4), 6), 4));
        mn = _mm512_or_si512(_mm512_srli_epi32(sbyte(j + 4), 4), _mm512_slli_epi32(_mm512_srli_epi32(sbyte(j), 6), 4));
      }
      scale[j] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sc));
      mnp[j] = _mm512_fmadd_ps(_mm512_set1_ps(128.0f), scale[j], _mm512_mul_ps(dmv, _mm512_cvtepi32_ps(mn)));
    }
    for (int p = 0; p < 4; ++p) {
      __m512 ae[MC], ao[MC];
      for (int m = 0; m < MC; ++m) ae[m] = ao[m] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512i d = _mm512_i32gather_epi32(vidx, b + 16 + 32 * p + 4 * i, 1);
        const __m512bh v0 = (__m512bh)_mm512_ternarylogic_epi32(d, nib, magic, 0xEA);
        const __m512bh v1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), nib, magic, 0xEA);
        const __m512bh v2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 8), nib, magic, 0xEA);
        const __m512bh v3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 12), nib, magic, 0xEA);
        for (int m = 0; m < MC; ++m) {
          const float* xe = reinterpret_cast<const float*>(xq + m * k + 256 * blk + 64 * p + 4 * i);
          const float* xo = xe + 16;  // sub-block 2p + 1: 32 values on
          ae[m] = _mm512_dpbf16_ps(ae[m], v0, (__m512bh)_mm512_set1_ps(xe[0]));
          ao[m] = _mm512_dpbf16_ps(ao[m], v1, (__m512bh)_mm512_set1_ps(xo[0]));
          ae[m] = _mm512_dpbf16_ps(ae[m], v2, (__m512bh)_mm512_set1_ps(xe[1]));
          ao[m] = _mm512_dpbf16_ps(ao[m], v3, (__m512bh)_mm512_set1_ps(xo[1]));
        }
      }
      for (int m = 0; m < MC; ++m) {
        t[m] = _mm512_fmadd_ps(ae[m], scale[2 * p], t[m]);
        t[m] = _mm512_fmadd_ps(ao[m], scale[2 * p + 1], t[m]);
        off[m] = _mm512_fmadd_ps(mnp[2 * p], _mm512_set1_ps(xs32[m * (k / 32) + 8 * blk + 2 * p]), off[m]);
        off[m] = _mm512_fmadd_ps(mnp[2 * p + 1], _mm512_set1_ps(xs32[m * (k / 32) + 8 * blk + 2 * p + 1]), off[m]);
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n_out), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(t[m], off[m])));
}

at::Tensor gguf_q4k_fly(const at::Tensor& x, const at::Tensor& w, int64_t n_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: contiguous bf16 [rows, K]");
  const int64_t rows = x.size(0), k = x.size(1), nsub = k / 32, nblocks = k / 256;
  TORCH_CHECK(k % 256 == 0 && n_out % 16 == 0, "K % 256 and N % 16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == n_out && w.size(1) == nblocks * 144,
              "w: the stored Q4_K rows");
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // x in pairs (v, v + 2), (v + 1, v + 3) per 4 values; and its sums per 32 values.
  std::vector<uint16_t> xq(rows * k);
  std::vector<float> xs32(rows * nsub);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t v = 0; v < k; v += 4) {
      const uint16_t* s = xb + m * k + v;
      uint16_t* d = xq.data() + m * k + v;
      d[0] = s[0], d[1] = s[2], d[2] = s[1], d[3] = s[3];
    }
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
  }
  at::Tensor y = at::empty({rows, n_out}, x.options());
  auto* yb = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  at::parallel_for(0, n_out / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t m0 = 0; m0 < rows; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, rows - m0);
        const uint8_t* wg = wp + 16 * g * row_bytes;
        const uint16_t* xm = xq.data() + m0 * k;
        const float* s = xs32.data() + m0 * nsub;
        uint16_t* ym = yb + m0 * n_out + 16 * g;
        switch (mc) {
          case 1: group_fly<1>(wg, row_bytes, nblocks, xm, k, s, ym, n_out); break;
          case 2: group_fly<2>(wg, row_bytes, nblocks, xm, k, s, ym, n_out); break;
          case 3: group_fly<3>(wg, row_bytes, nblocks, xm, k, s, ym, n_out); break;
          default: group_fly<4>(wg, row_bytes, nblocks, xm, k, s, ym, n_out); break;
        }
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gguf_fly, m) { m.def("gguf_q4k_fly(Tensor x, Tensor w, int n_out) -> Tensor"); }
TORCH_LIBRARY_IMPL(gguf_fly, CPU, m) { m.impl("gguf_q4k_fly", &gguf_q4k_fly); }
