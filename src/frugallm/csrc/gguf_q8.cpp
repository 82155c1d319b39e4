// requires: avx2 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Linears on GGUF quantized weights as stored, with the activations quantized to int8 (llama.cpp's arithmetic, NOT
// exact): each input row is cut into blocks of 32 values, each block stored as 32 int8 codes qx and one fp32 scale
// dx, and the weight's integer codes meet qx in integer dot products (AVX2 maddubs + madd, or one vpdpbusd with
// AVX512-VNNI / AVX-VNNI). Decode is then bound by reading the weights, not by converting them to float.
// Registered as torch.ops.frugallm.gguf_linear_q8 (csrc/gguf_linear.cpp keeps the exact kernel).
//
//   gguf_linear_q8(x [rows, K] float32|bfloat16 contiguous, w uint8 [N, K / block * bytes] contiguous, qtype, N,
//                  bias float32 [N]?) -> [rows, N] in x's dtype (fp32 sums; bf16 output rounded once, RNE)
//
// Activation quantization (csrc/gguf_q8_act.h, shared with gguf_x16.cpp's int8 path), per block of 32 values (the
// Python reference quant/gguf_linear.py q8_quantize repeats it operation for operation): amax = max |x|, dx = amax / 127 (fp32), inv = dx != 0 ? 1 / dx : 0,
// qx = round-half-to-even(x * inv) (the CPU's default rounding mode, as _mm256_cvtps_epi32 and nearbyint use),
// clamped to [-127, 127]. Unlike llama.cpp's Q8_0 (fp16 scale) and Q8_K (one scale per 256), dx stays fp32 per 32.
//
// Weight formats (layouts: see csrc/gguf_linear.cpp; qtype numbers are GGMLQuantizationType). Every 32-value chunk
// is decoded to 32 unsigned codes u with w = s * u - o per 16-value half (s, o fp32, the reference's products):
//   Q4_0 (2)  s = d, o = 8 d        Q4_1 (3)  s = d, o = -m        Q5_0 (6)  s = d, o = 16 d     Q5_1 (7) s = d, o = -m
//   Q4_K (12) s = d sc, o = dmin mn  Q5_K (13) as Q4_K, 5-bit u     Q6_K (14) s = d sc (per 16), o = 32 s
//   Q8_0 (8)  signed codes q, w = d q (the sign moves onto qx: |q| . sign(qx, q), as maddubs needs one unsigned side)
// so a row's dot with one input is  sum_chunks [ s dx (u . qx) ]  -  sum_chunks [ o dx (sum qx) ]:
// the integer dots are exact (u <= 63, |qx| <= 127: maddubs' int16 pair sums stay below 2^15), each chunk's int32
// partials meet (s dx) in one fp32 FMA per 8 lanes, and the offsets meet the per-16 / per-32 sums of dx qx
// (computed once per call, shared by every weight row).
//
// Code paths: AVX2 + FMA + F16C (maddubs + madd), AVX512-VNNI with VL or AVX-VNNI (vpdpbusd on 256-bit vectors).
// Two chunks per 512-bit vector measured 0.8-1.07x of this on an AVX-512 EPYC (512-bit ops split in two there,
// plus the inserts to pair chunks), so every level runs 256-bit vectors.
// Compiled below AVX2 the op refuses to run (gguf_linear_q8_vectorized() is false; callers keep the exact path).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"
#include "gguf_format.h"
#include "gguf_q8_act.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FRUGALLM_Q8_VEC 1
constexpr bool kVectorized = true;
#else
constexpr bool kVectorized = false;
#endif

// Lambdas called per chunk must inline: out of line, their accumulators go through memory (2x slower).
#define FRUGALLM_INLINE __attribute__((always_inline))

namespace {

using namespace frugallm::gguf;
#if defined(FRUGALLM_Q8_VEC)
using namespace frugallm::q8act;
#endif

// The types this file runs (Q2_K / Q3_K keep the exact kernel).
constexpr bool runs_q8(int64_t t) {
  return t == Q4_0 || t == Q4_1 || t == Q5_0 || t == Q5_1 || t == Q8_0 || t == Q4_K || t == Q5_K || t == Q6_K;
}

// Which integer dot product this build uses (tests and benchmarks report it).
const char* dot_isa() {
#if !defined(FRUGALLM_Q8_VEC)
  return "none";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVXVNNI__)
  return "avxvnni";
#else
  return "avx2";
#endif
}

#if defined(FRUGALLM_Q8_VEC)

// Per 32-bit lane i: the sum of the 4 byte products u[4i..4i+3] * s[4i..4i+3] (u unsigned, s signed; |u s| small
// enough that maddubs' pair sums never saturate, see the header).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}


// The 8 sub-block scales d * sc_j (stored to sc) and offsets dmin * mn_j (as a vector) of a Q4_K / Q5_K block. Its
// 12 bytes as words w0, w1, w2: sc_0..3 = w0 & 63 per byte, mn_0..3 = w1 & 63, and sub-blocks 4..7 take their low 4
// bits from w2's nibbles (low: scale, high: min) and their high 2 bits from the top bits of w0 (scale) / w1 (min).
// Branch-free word arithmetic: a per-sub-block scalar unpack cost as much as the block's integer dots.
inline void k_scales_mins(const uint8_t* b, float* sc, __m256& mn) {
  uint32_t w[3];
  std::memcpy(w, b + 4, 12);
  const uint32_t lo6 = 0x3f3f3f3f, lo4 = 0x0f0f0f0f, lo2 = 0x03030303;
  const uint64_t scales = (w[0] & lo6) | static_cast<uint64_t>((w[2] & lo4) | (((w[0] >> 6) & lo2) << 4)) << 32;
  const uint64_t mins = (w[1] & lo6) | static_cast<uint64_t>(((w[2] >> 4) & lo4) | (((w[1] >> 6) & lo2) << 4)) << 32;
  auto as_float = [](uint64_t v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(v))));
  };
  _mm256_store_ps(sc, _mm256_mul_ps(_mm256_set1_ps(f16(b)), as_float(scales)));
  mn = _mm256_mul_ps(_mm256_set1_ps(f16(b + 2)), as_float(mins));
}

// out[m] = row . dequant(x[m0 + m]) for MC inputs. Two accumulator sets (even and odd chunks) keep two FMA chains
// in flight where registers allow (MC <= 4).
template <int64_t T, int MC>
void dot_row(const uint8_t* row, int64_t nblocks, const QuantizedX& xq, int64_t m0, float* out) {
  const int64_t k = xq.k, nc = xq.nc;
  const int8_t* qx = xq.q.data() + m0 * k;
  const float* dx = xq.d.data() + m0 * nc;
  const float* s16 = xq.s16.data() + m0 * 2 * nc;
  const float* s32 = xq.s32.data() + m0 * nc;
  __m256 even[MC], odd_store[MC], offv[MC];
  __m256* odd = MC <= 4 ? odd_store : even;
  float offs[MC];
  for (int m = 0; m < MC; ++m) {
    even[m] = odd_store[m] = offv[m] = _mm256_setzero_ps();
    offs[m] = 0.0f;
  }
  // Chunk c (of 32 values) with unsigned codes u and per-lane weight scales sv (lanes 0-3: values 0-15, 4-7: 16-31).
  auto chunk = [&](int64_t c, __m256i u, __m256 sv, __m256* acc) FRUGALLM_INLINE {
    for (int m = 0; m < MC; ++m) {
      const __m256i xv = load32(reinterpret_cast<const uint8_t*>(qx + m * k + 32 * c));
      const __m256i p = dot_u8s8(u, xv);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, _mm256_broadcast_ss(dx + m * nc + c)),
                               acc[m]);
    }
  };
  if constexpr (T == Q8_0) {
    auto block = [&](int64_t blk, __m256* acc) FRUGALLM_INLINE {
      const uint8_t* b = row + blk * 34;
      const __m256i q = load32(b + 2);
      const __m256i u = _mm256_sign_epi8(q, q);  // |q|; -128 becomes 0x80 = 128 read unsigned, still exact
      const __m256 sv = _mm256_set1_ps(f16(b));
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_sign_epi8(load32(reinterpret_cast<const uint8_t*>(qx + m * k + 32 * blk)), q);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, xv)),
                                 _mm256_mul_ps(sv, _mm256_broadcast_ss(dx + m * nc + blk)), acc[m]);
      }
    };
    int64_t blk = 0;
    for (; blk + 1 < nblocks; blk += 2) {
      block(blk, even);
      block(blk + 1, odd);
    }
    if (blk < nblocks) block(blk, even);
  } else if constexpr (T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q5_1) {
    constexpr int64_t bytes = format_of(T).bytes;
    auto block = [&](int64_t blk, __m256* acc) FRUGALLM_INLINE {
      const uint8_t* b = row + blk * bytes;
      const float d = f16(b);
      __m256i u;
      if constexpr (T == Q4_0) u = nibbles16(b + 2);
      if constexpr (T == Q4_1) u = nibbles16(b + 4);
      if constexpr (T == Q5_0) u = _mm256_or_si256(nibbles16(b + 6), bits32_x16(b + 2));
      if constexpr (T == Q5_1) u = _mm256_or_si256(nibbles16(b + 8), bits32_x16(b + 4));
      const float o = T == Q4_0 ? 8.0f * d : T == Q5_0 ? 16.0f * d : -f16(b + 2);
      chunk(blk, u, _mm256_set1_ps(d), acc);
      for (int m = 0; m < MC; ++m) offs[m] += o * s32[m * nc + blk];
    };
    int64_t blk = 0;
    for (; blk + 1 < nblocks; blk += 2) {
      block(blk, even);
      block(blk + 1, odd);
    }
    if (blk < nblocks) block(blk, even);
  } else if constexpr (T == Q4_K || T == Q5_K) {
    constexpr int64_t bytes = format_of(T).bytes;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * bytes;
      alignas(32) float sc[8];
      __m256 mv;
      k_scales_mins(b, sc, mv);
      const uint8_t* qs = b + (T == Q4_K ? 16 : 48);
      [[maybe_unused]] const __m256i hbits = T == Q5_K ? load32(b + 16) : _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int pair = 0; pair < 4; ++pair) {
        const __m256i v = load32(qs + 32 * pair);
        __m256i lo = nib_lo(v), hi = nib_hi(v);
        if constexpr (T == Q5_K) {
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(bits_at(hbits, 2 * pair, 1), 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(bits_at(hbits, 2 * pair + 1, 1), 4));
        }
        chunk(8 * blk + 2 * pair, lo, _mm256_set1_ps(sc[2 * pair]), even);
        chunk(8 * blk + 2 * pair + 1, hi, _mm256_set1_ps(sc[2 * pair + 1]), odd);
      }
      for (int m = 0; m < MC; ++m) offv[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(s32 + m * nc + 8 * blk), offv[m]);
    }
  } else {  // Q6_K: 16 int8 scales, one per 16 values
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const uint8_t* b = row + blk * 210;
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const __m256 dv = _mm256_set1_ps(f16(b + 208));
      const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
      alignas(32) float sc[16];
      _mm256_store_ps(sc, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))));
      _mm256_store_ps(sc + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = load32(ql + 64 * h), l1 = load32(ql + 64 * h + 32), hb = load32(qh + 32 * h);
        const __m256 sch = _mm256_load_ps(sc + 8 * h);  // the scales of this half's 8 groups of 16
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m256i src = (c & 1) ? l1 : l0;
          const __m256i lo = c < 2 ? nib_lo(src) : nib_hi(src);
          const __m256i u = _mm256_or_si256(lo, _mm256_slli_epi16(bits_at(hb, 2 * c, 3), 4));
          // lanes 0-3 (values 0-15): scale 2c of the half, lanes 4-7: scale 2c + 1
          const __m256 sv = _mm256_permutevar8x32_ps(sch, _mm256_setr_epi32(2 * c, 2 * c, 2 * c, 2 * c, 2 * c + 1,
                                                                             2 * c + 1, 2 * c + 1, 2 * c + 1));
          chunk(8 * blk + 4 * h + c, u, sv, (c & 1) ? odd : even);
        }
      }
      // o = 32 s per 16 values, against the per-16 sums of dx qx.
      const __m256 o0 = _mm256_mul_ps(_mm256_set1_ps(32.0f), _mm256_load_ps(sc));
      const __m256 o1 = _mm256_mul_ps(_mm256_set1_ps(32.0f), _mm256_load_ps(sc + 8));
      for (int m = 0; m < MC; ++m) {
        const float* s = s16 + m * 2 * nc + 16 * blk;
        offv[m] = _mm256_fmadd_ps(o1, _mm256_loadu_ps(s + 8), _mm256_fmadd_ps(o0, _mm256_loadu_ps(s), offv[m]));
      }
    }
  }
  for (int m = 0; m < MC; ++m) {
    const __m256 acc = MC <= 4 ? _mm256_add_ps(even[m], odd_store[m]) : even[m];
    out[m] = hsum(acc) - hsum(offv[m]) - offs[m];
  }
}

constexpr int64_t kMaxRows = 8;  // inputs per pass over a weight row: its codes are decoded once for all of them

template <int64_t T>
void dot_rows(const uint8_t* row, int64_t nblocks, const QuantizedX& xq, int64_t m0, int64_t mc, float* out) {
  switch (mc) {
    case 1: return dot_row<T, 1>(row, nblocks, xq, m0, out);
    case 2: return dot_row<T, 2>(row, nblocks, xq, m0, out);
    case 3: return dot_row<T, 3>(row, nblocks, xq, m0, out);
    case 4: return dot_row<T, 4>(row, nblocks, xq, m0, out);
    case 5: return dot_row<T, 5>(row, nblocks, xq, m0, out);
    case 6: return dot_row<T, 6>(row, nblocks, xq, m0, out);
    case 7: return dot_row<T, 7>(row, nblocks, xq, m0, out);
    default: return dot_row<T, 8>(row, nblocks, xq, m0, out);
  }
}

using DotFn = void (*)(const uint8_t*, int64_t, const QuantizedX&, int64_t, int64_t, float*);
DotFn dot_fn(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return &dot_rows<Q4_0>;
    case Q4_1: return &dot_rows<Q4_1>;
    case Q5_0: return &dot_rows<Q5_0>;
    case Q5_1: return &dot_rows<Q5_1>;
    case Q8_0: return &dot_rows<Q8_0>;
    case Q4_K: return &dot_rows<Q4_K>;
    case Q5_K: return &dot_rows<Q5_K>;
    case Q6_K: return &dot_rows<Q6_K>;
    default: return nullptr;
  }
}
#endif  // FRUGALLM_Q8_VEC

Format check_weight(const at::Tensor& w, int64_t qtype, int64_t rows, int64_t cols) {
  return frugallm::gguf::check_weight(w, qtype, rows, cols, runs_q8(qtype), " for int8 activations",
                                      "Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14");
}

at::Tensor gguf_linear_q8(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n_out,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous float32 or bfloat16 [rows, in_features] tensor");
  const int64_t rows = x.size(0), k = x.size(1);
  const Format f = check_weight(w, qtype, n_out, k);
  const float* b = frugallm::bias_ptr(bias, n_out);
  TORCH_CHECK(kVectorized, "gguf_linear_q8 was built without AVX2 + FMA + F16C (use gguf_linear)");
  at::Tensor y = at::empty({rows, n_out}, x.options());
#if defined(FRUGALLM_Q8_VEC)
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const QuantizedX xq = quantize_x(x);
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  auto* yb = bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), nblocks = k / f.block;
  const DotFn dot = dot_fn(qtype);
  // Each thread a contiguous run of weight rows: one sequential stream through the blocks.
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    float out[kMaxRows];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
        const int64_t mc = std::min(kMaxRows, rows - m0);
        dot(wp + n * row_bytes, nblocks, xq, m0, mc, out);
        for (int64_t m = 0; m < mc; ++m) {
          const float v = b != nullptr ? out[m] + b[n] : out[m];
          if (bf16)
            yb[(m0 + m) * n_out + n] = frugallm::float_to_bf16(v);
          else
            yf[(m0 + m) * n_out + n] = v;
        }
      }
    }
  });
#else
  (void)f;
  (void)b;
#endif
  return y;
}

bool gguf_q8_vectorized() { return kVectorized; }
std::string gguf_q8_isa() { return dot_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("gguf_linear_q8(Tensor x, Tensor w, int qtype, int out_features, Tensor? bias) -> Tensor");
  m.def("gguf_q8_vectorized() -> bool", &gguf_q8_vectorized);
  m.def("gguf_q8_isa() -> str", &gguf_q8_isa);
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("gguf_linear_q8", &gguf_linear_q8); }
