// KIVI decode attention on CPU: one-token queries attend over KIVI-packed chunks (kv/kivi.py PagedKIVI) without
// dequantizing them. Registered as torch.ops.frugallm.kivi_decode_attention.
//
// Why a kernel: the torch path dequantizes every packed token of every layer at every decode step into a bf16
// copy ([kv_heads, tokens, head_dim], 8x the packed bytes at 2 bits) and then runs SDPA over it. Here the codes
// are read once, at their packed size, and the quantization is folded into the query and the probabilities:
//   keys (per channel c, per group of G tokens: scale s_c, zero z_c):  q.k_t = sum_c (q_c s_c) code_tc + sum_c q_c z_c
//   values (per token t: scale s_t, zero z_t):  sum_t p_t v_t = sum_t (p_t s_t) code_t + (sum_t p_t z_t)
// so a key costs one multiply-add per channel on its codes and a group's (q s, q.z) is computed once. Values stay
// in the Hadamard-rotated frame they were quantized in: the caller rotates the output back (it is linear).
//
// Input: each chunk's bytes in one row (the caller gathers its blocks from the pool), laid out as
// PagedKIVI.encode writes them: keys = codes [kv_heads, chunk, D*bits/8] | scale [kv_heads, chunk/G, D] (fp8 e4m3
// or fp16) | zero [kv_heads, chunk/G, D] (fp16); values = codes [kv_heads, chunk, D*bits/8] | scale
// [kv_heads, chunk, 1] | zero [kv_heads, chunk, 1] (both fp8 e4m3 or fp16). Codes pack 8/bits channels to a
// byte, channel per*i + j in bits j*bits of byte i (kv/quantize.py pack). Output: the attention over the packed
// tokens (normalized) and its log-sum-exp per query head, to merge with the attention over the exact slots.
// Portable C++ with `omp simd` loops: native.py builds it once per ISA level (AVX-512, AVX2, generic).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

inline float half_at(const uint8_t* p, int64_t i) {
  c10::Half h;
  std::memcpy(&h, p + 2 * i, 2);
  return static_cast<float>(h);
}

inline float fp8_at(const uint8_t* p, int64_t i) {
  return static_cast<float>(c10::Float8_e4m3fn(p[i], c10::Float8_e4m3fn::from_bits()));
}

using frugallm::exp_nonpositive;

struct Layout {
  int64_t kv_heads, head_dim, chunk, group, bits;
  bool fp8;  // key scales and value scales / zeros in fp8 e4m3 (else fp16); key zeros are always fp16
  int64_t cb() const { return head_dim * bits / 8; }  // code bytes per token and head
  int64_t groups() const { return chunk / group; }
  int64_t ssz() const { return fp8 ? 1 : 2; }
  int64_t key_bytes() const { return kv_heads * (chunk * cb() + groups() * head_dim * (ssz() + 2)); }
  int64_t value_bytes() const { return kv_heads * chunk * (cb() + 2 * ssz()); }
};

// Unpacks one token's codes (PER to a byte, channel PER*i + j in bits j*BITS of byte i) into fp32 ``row[D]``: once
// per token and KV head, then shared by the head's whole GQA query group as plain fp32 loops that vectorize.
template <int PER>
inline void unpack_row(const uint8_t* codes, float* row, int64_t cb) {
  constexpr int BITS = 8 / PER;
  constexpr int MASK = (1 << BITS) - 1;
  for (int64_t i = 0; i < cb; ++i) {
    const int byte = codes[i];
    for (int j = 0; j < PER; ++j) row[PER * i + j] = static_cast<float>((byte >> (j * BITS)) & MASK);
  }
}

template <int PER>
void kivi_attention(const float* q, const uint8_t* kc, const uint8_t* vc, int64_t k_stride, int64_t v_stride,
                    const int64_t* offsets, float* out, float* lse, int64_t rows, int64_t q_heads, const Layout& L,
                    float scale) {
  const int64_t H = L.kv_heads, D = L.head_dim, C = L.chunk, G = L.group, CB = L.cb(), NG = L.groups();
  const int64_t group = q_heads / H;
  const int64_t k_scale_at = H * C * CB, k_zero_at = k_scale_at + H * NG * D * L.ssz();
  const int64_t v_scale_at = H * C * CB, v_zero_at = v_scale_at + H * C * L.ssz();
  at::parallel_for(0, rows * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(group * D), qg_s(group * D), bias(group), scores, row(D), zrow(D), zsum(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / H, h = task % H;
      const int64_t c0 = offsets[r], nc = offsets[r + 1] - c0, len = nc * C;
      const float* qr = q + (r * q_heads + h * group) * D;
      float* o = out + (r * q_heads + h * group) * D;
      float* l = lse + r * q_heads + h * group;
      if (len == 0) {
        std::fill(o, o + group * D, 0.0f);
        std::fill(l, l + group, -std::numeric_limits<float>::infinity());
        continue;
      }
      for (int64_t i = 0; i < group * D; ++i) qs[i] = qr[i] * scale;
      scores.resize(group * len);
      for (int64_t ci = 0; ci < nc; ++ci) {
        const uint8_t* base = kc + (c0 + ci) * k_stride;
        for (int64_t gi = 0; gi < NG; ++gi) {
          const int64_t at = h * NG + gi;
          const uint8_t* sp = base + k_scale_at + at * D * L.ssz();
          const uint8_t* zp = base + k_zero_at + at * D * 2;
          for (int64_t c = 0; c < D; ++c) {  // the group's scales and zeros
            row[c] = L.fp8 ? fp8_at(sp, c) : half_at(sp, c);
            zrow[c] = half_at(zp, c);
          }
          for (int64_t g = 0; g < group; ++g) {  // the group's (q_c s_c), and sum_c q_c z_c
            float b = 0.0f;
#pragma omp simd reduction(+ : b)
            for (int64_t c = 0; c < D; ++c) {
              qg_s[g * D + c] = qs[g * D + c] * row[c];
              b += qs[g * D + c] * zrow[c];
            }
            bias[g] = b;
          }
          for (int64_t t = gi * G; t < (gi + 1) * G; ++t) {
            unpack_row<PER>(base + (h * C + t) * CB, row.data(), CB);
            for (int64_t g = 0; g < group; ++g) {
              const float* qv = qg_s.data() + g * D;
              float a = 0.0f;
#pragma omp simd reduction(+ : a)
              for (int64_t c = 0; c < D; ++c) a += qv[c] * row[c];
              scores[g * len + ci * C + t] = a + bias[g];
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax over the packed tokens; its log-sum-exp for the merge
        float* sg = scores.data() + g * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < len; ++s) mx = std::max(mx, sg[s]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < len; ++s) {
          sg[s] = exp_nonpositive(sg[s] - mx);
          sum += sg[s];
        }
        l[g] = mx + std::log(sum);
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < len; ++s) sg[s] *= inv;
      }
      std::fill(o, o + group * D, 0.0f);
      std::fill(zsum.begin(), zsum.end(), 0.0f);
      for (int64_t ci = 0; ci < nc; ++ci) {
        const uint8_t* base = vc + (c0 + ci) * v_stride;
        for (int64_t t = 0; t < C; ++t) {
          const int64_t at = h * C + t;
          const float s = L.fp8 ? fp8_at(base + v_scale_at, at) : half_at(base + v_scale_at, at);
          const float z = L.fp8 ? fp8_at(base + v_zero_at, at) : half_at(base + v_zero_at, at);
          unpack_row<PER>(base + at * CB, row.data(), CB);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + ci * C + t];
            const float w = p * s;
            zsum[g] += p * z;
            float* og = o + g * D;
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) og[c] += w * row[c];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < D; ++c) o[g * D + c] += zsum[g];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kivi_decode_attention(const at::Tensor& q, const at::Tensor& k_chunks,
                                                         const at::Tensor& v_chunks, const at::Tensor& offsets,
                                                         int64_t kv_heads, int64_t chunk, int64_t group, int64_t bits,
                                                         bool fp8, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [rows, q_heads, head_dim] tensor");
  const int64_t rows = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  TORCH_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, "q heads must be a multiple of kv_heads");
  TORCH_CHECK(group >= 1 && chunk >= group && chunk % group == 0, "chunk must be whole groups");
  TORCH_CHECK(head_dim % (8 / bits) == 0, "head_dim must be a multiple of the codes per byte");
  const Layout L{kv_heads, head_dim, chunk, group, bits, fp8};
  // Rows may be longer than a chunk's bytes (the whole blocks a chunk fills, gathered from the pool).
  TORCH_CHECK(k_chunks.dim() == 2 && k_chunks.scalar_type() == at::kByte && k_chunks.stride(1) == 1 &&
                  k_chunks.size(1) >= L.key_bytes(),
              "k_chunks must be uint8 [chunks, >= ", L.key_bytes(), "] with contiguous rows");
  TORCH_CHECK(v_chunks.dim() == 2 && v_chunks.scalar_type() == at::kByte && v_chunks.stride(1) == 1 &&
                  v_chunks.size(1) >= L.value_bytes() && v_chunks.size(0) == k_chunks.size(0),
              "v_chunks must be uint8 [chunks, >= ", L.value_bytes(), "] with contiguous rows");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  offsets.size(0) == rows + 1,
              "offsets must be a contiguous int64 [rows + 1] tensor");
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(off[r] >= 0 && off[r] <= off[r + 1] && off[r + 1] <= k_chunks.size(0), "offsets out of range");
  at::Tensor out = at::empty({rows, q_heads, head_dim}, q.options());
  at::Tensor lse = at::empty({rows, q_heads}, q.options());
  const auto run = [&](auto per) {
    kivi_attention<decltype(per)::value>(q.data_ptr<float>(), k_chunks.data_ptr<uint8_t>(),
                                         v_chunks.data_ptr<uint8_t>(), k_chunks.stride(0), v_chunks.stride(0), off,
                                         out.data_ptr<float>(),
                                         lse.data_ptr<float>(), rows, q_heads, L, static_cast<float>(scale));
  };
  if (bits == 2)
    run(std::integral_constant<int, 4>{});
  else
    run(std::integral_constant<int, 2>{});
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("kivi_decode_attention(Tensor q, Tensor k_chunks, Tensor v_chunks, Tensor offsets, int kv_heads, "
        "int chunk, int group, int bits, bool fp8, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("kivi_decode_attention", &kivi_decode_attention); }
