// requires: avx2 (frugallm/native.py builds this kernel only on CPUs at that ISA level; below it torch runs)
// Multi-LoRA product for a batch of rows that each use their own adapter (Punica's BGMV, shrink and expand fused),
// added in place to a projection's output. Registered as torch.ops.frugallm.lora_bgmv.
//
// For each row m with slot s = index[m] (rows whose index is outside [0, S) have no adapter) and each part p of
// the projection's output (q/k/v or gate/up of a fused linear; one part otherwise):
//
//     t   = A[p, s] @ x[m]                  shrink, [rank]   A[p, s] = a_pool[p, s*r : s*r + rank]   [rank, in]
//     y[m, part p] += t @ B[s, p]            expand           B[s, p]: [rank, n_p] in column tiles of b_tiles
//
// with rank = ranks[s, p] (0: slot s does not adapt part p; an adapter of rank < r is not padded with work), the
// LoRA scaling already folded into B, and for DoRA first y[m] = (y[m] - bias) * dora_scale[s] + bias.
//
// B is stored in column tiles, b_tiles [S, T, r, 64]: part p's columns [64 j, 64 j + 64) of slot s are the tile
// b_tiles[s, tile0_p + j] ([r, 64], k-major; past n_p zero), tile0_p = sum over earlier parts of ceil(n_q / 64).
// The expand then reads each slot's B as one sequential stream (k-major rows of [S*r, out] are r strided streams
// of 128 bytes per pass, which the hardware prefetcher follows poorly: 1.4x slower over SmolLM2's pools, best of
// interleaved runs on a loaded 2-core machine).
//
// Why a kernel: the torch path multiplies every row by every slot in range (two GEMMs and a mask, five ops per
// part): with 8 rows on 8 adapters that is 8x the FLOPs, and at decode sizes CPU GEMMs in bf16 cost ~170 us each.
// Here each row reads only its own slot's factors once (the bytes a memory-bound step pays for), in the pool's
// dtype converted to fp32 in registers, with t kept in fp32; one call covers every part and row of a projection.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRank = 64;
constexpr int64_t kTile = 64;  // output columns per tile of B (4 AVX-512 or 8 AVX2 accumulators)
constexpr int64_t kGrainMacs = 32768;  // per thread task: below this OpenMP's fork costs more than it saves

using bf16 = c10::BFloat16;

// -- fp32 vectors of the widest ISA the build targets (AVX-512: 16 lanes, AVX2: 8), loads converting from bf16 ----
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float v) { return _mm512_set1_ps(v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstore(bf16* p, vf v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else  // round to nearest even as torch does; NaN stays NaN (as frugallm::float_to_bf16)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#endif
}
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#else
constexpr int64_t W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float v) { return _mm256_set1_ps(v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore(bf16* p, vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  // 32 -> 16 bits: packus works per 128-bit lane (values are < 2^16, no saturation), then the lanes are joined.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float sload(const float* p) { return *p; }
inline float sload(const bf16* p) { return frugallm::bf16_to_float(p->x); }
inline void sstore(float* p, float v) { *p = v; }
inline void sstore(bf16* p, float v) { p->x = frugallm::float_to_bf16(v); }

// t[k] = a[k] . x for k < rank (a: rank rows of `in`, row stride `in`; x: fp32). Four rows share each load of x.
template <typename TW>
void shrink(const TW* a, const float* x, int64_t in, int64_t rank, float* t) {
  int64_t k = 0;
  for (; k + 4 <= rank; k += 4) {
    const TW *a0 = a + k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    int64_t i = 0;
    for (; i + W <= in; i += W) {
      const vf xv = vload(x + i);
      s0 = vfma(vload(a0 + i), xv, s0);
      s1 = vfma(vload(a1 + i), xv, s1);
      s2 = vfma(vload(a2 + i), xv, s2);
      s3 = vfma(vload(a3 + i), xv, s3);
    }
    float r0 = vsum(s0), r1 = vsum(s1), r2 = vsum(s2), r3 = vsum(s3);
    for (; i < in; ++i) {
      r0 += sload(a0 + i) * x[i];
      r1 += sload(a1 + i) * x[i];
      r2 += sload(a2 + i) * x[i];
      r3 += sload(a3 + i) * x[i];
    }
    t[k] = r0, t[k + 1] = r1, t[k + 2] = r2, t[k + 3] = r3;
  }
  for (; k < rank; ++k) {
    const TW* ak = a + k * in;
    vf s = vzero();
    int64_t i = 0;
    for (; i + W <= in; i += W) s = vfma(vload(ak + i), vload(x + i), s);
    float r = vsum(s);
    for (; i < in; ++i) r += sload(ak + i) * x[i];
    t[k] = r;
  }
}

// y[o] = dora(y[o]) + sum_k t[k] * B[k, o] for o < n, with dora(v) = (v - bias[o]) * g[o] + bias[o] when g is
// given (bias may be null), else v. B: ceil(n / 64) tiles [r, 64] from `tiles` on; a tile's 64 outputs stay in
// registers across the rank loop.
template <typename TW, typename TY>
void expand(const TW* tiles, int64_t r, const float* t, int64_t rank, TY* y, int64_t n, const float* g,
            const float* bias) {
  auto start = [&](int64_t o) {
    vf v = vload(y + o);
    if (g != nullptr) {
      const vf bv = bias != nullptr ? vload(bias + o) : vzero();
      v = vfma(vsub(v, bv), vload(g + o), bv);
    }
    return v;
  };
  constexpr int64_t V = kTile / W;
  for (int64_t o = 0; o < n; o += kTile) {
    const TW* tile = tiles + o * r;  // tile o / 64
    if (o + kTile <= n) {
      vf c[V];
#pragma GCC unroll 8
      for (int64_t j = 0; j < V; ++j) c[j] = start(o + j * W);
      for (int64_t k = 0; k < rank; ++k) {
        const vf tk = vset(t[k]);
#pragma GCC unroll 8
        for (int64_t j = 0; j < V; ++j) c[j] = vfma(vload(tile + k * kTile + j * W), tk, c[j]);
      }
#pragma GCC unroll 8
      for (int64_t j = 0; j < V; ++j) vstore(y + o + j * W, c[j]);
      continue;
    }
    int64_t j = 0;  // the last, partial tile: vectors while they fit, then scalars
    for (; o + j + W <= n; j += W) {
      vf c = start(o + j);
      for (int64_t k = 0; k < rank; ++k) c = vfma(vload(tile + k * kTile + j), vset(t[k]), c);
      vstore(y + o + j, c);
    }
    for (; o + j < n; ++j) {
      float v = sload(y + o + j);
      if (g != nullptr) {
        const float bo = bias != nullptr ? bias[o + j] : 0.0f;
        v = (v - bo) * g[o + j] + bo;
      }
      for (int64_t k = 0; k < rank; ++k) v += sload(tile + k * kTile + j) * t[k];
      sstore(y + o + j, v);
    }
  }
}

template <typename TX, typename TW, typename TY>
void run(TY* y, int64_t ldy, const TX* x, int64_t ldx, const TW* a_pool, const TW* b_tiles, const int64_t* index,
         const int32_t* ranks, const std::vector<int64_t>& parts, const std::vector<int64_t>& offsets,
         const std::vector<int64_t>& tile0, int64_t tiles, int64_t rows, int64_t in, int64_t out, int64_t slots,
         int64_t r, const float* dora, const float* bias) {
  const auto n_parts = static_cast<int64_t>(parts.size());
  // Work items are (row, part): they write disjoint slices of y. Grain from the average item's multiply-adds.
  int64_t macs = 1;
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t s = index[m];
    if (s < 0 || s >= slots) continue;
    for (int64_t p = 0; p < n_parts; ++p) macs += ranks[s * n_parts + p] * (in + parts[p]);
  }
  const int64_t items = rows * n_parts;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs * items / macs);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in);
    float t[kMaxRank];
    int64_t converted = -1;  // the row held in xf
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / n_parts, p = item % n_parts, s = index[m];
      if (s < 0 || s >= slots) continue;
      const int64_t rank = ranks[s * n_parts + p];
      const float* g = dora != nullptr ? dora + s * out + offsets[p] : nullptr;
      if (rank == 0 && g == nullptr) continue;
      if (rank > 0 && converted != m) {
        const TX* xm = x + m * ldx;
        for (int64_t i = 0; i < in; ++i) xf[i] = sload(xm + i);
        converted = m;
      }
      if (rank > 0) shrink(a_pool + (p * slots + s) * r * in, xf.data(), in, rank, t);
      expand(b_tiles + (s * tiles + tile0[p]) * r * kTile, r, t, rank, y + m * ldy + offsets[p], parts[p], g,
             bias != nullptr ? bias + offsets[p] : nullptr);
    }
  });
}

template <typename Fn>
void float_or_bf16(const at::Tensor& t, const char* name, Fn&& fn) {
  if (t.scalar_type() == at::kFloat) return fn(t.data_ptr<float>());
  if (t.scalar_type() == at::kBFloat16) return fn(t.data_ptr<bf16>());
  TORCH_CHECK(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
}

void lora_bgmv(at::Tensor y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_tiles,
               const at::Tensor& index, const at::Tensor& ranks, at::IntArrayRef parts,
               const std::optional<at::Tensor>& dora_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, in_features] with unit column stride");
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1, "y must be [rows, out_features] with unit column stride");
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1), n_parts = static_cast<int64_t>(parts.size());
  TORCH_CHECK(y.size(0) == rows, "y has ", y.size(0), " rows, x has ", rows);
  TORCH_CHECK(a_pool.dim() == 3 && a_pool.is_contiguous() && a_pool.size(0) == n_parts && a_pool.size(2) == in,
              "a_pool must be a contiguous [parts, slots * rank, in_features] tensor matching x");
  TORCH_CHECK(ranks.dim() == 2 && ranks.size(1) == n_parts && ranks.scalar_type() == at::kInt && ranks.is_contiguous(),
              "ranks must be a contiguous int32 [slots, parts] tensor");
  const int64_t slots = ranks.size(0);
  TORCH_CHECK(slots > 0 && a_pool.size(1) % slots == 0, "a_pool's rows are not slots x rank");
  const int64_t r = a_pool.size(1) / slots;
  TORCH_CHECK(r <= kMaxRank, "rank ", r, " is above ", kMaxRank);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == rows && index.scalar_type() == at::kLong && index.is_contiguous(),
              "index must be a contiguous int64 [rows] tensor");
  std::vector<int64_t> sizes(parts.begin(), parts.end()), offsets(n_parts), tile0(n_parts);
  int64_t total = 0, tiles = 0;
  for (int64_t p = 0; p < n_parts; ++p) {
    TORCH_CHECK(sizes[p] >= 0, "parts must be non-negative");
    offsets[p] = total, total += sizes[p];
    tile0[p] = tiles, tiles += (sizes[p] + kTile - 1) / kTile;
  }
  TORCH_CHECK(total == out, "parts sum to ", total, ", y has ", out, " features");
  TORCH_CHECK(b_tiles.dim() == 4 && b_tiles.is_contiguous() && b_tiles.size(0) == slots && b_tiles.size(1) == tiles &&
                  b_tiles.size(2) == r && b_tiles.size(3) == kTile && b_tiles.scalar_type() == a_pool.scalar_type(),
              "b_tiles must be a contiguous [slots, ", tiles, ", rank, ", kTile, "] tensor of a_pool's dtype");
  const int32_t* rk = ranks.data_ptr<int32_t>();
  for (int64_t i = 0; i < slots * n_parts; ++i) TORCH_CHECK(rk[i] >= 0 && rk[i] <= r, "ranks must be in [0, ", r, "]");
  const float* dora = nullptr;
  const float* bias_p = nullptr;
  if (dora_scale.has_value()) {
    TORCH_CHECK(dora_scale->scalar_type() == at::kFloat && dora_scale->is_contiguous() && dora_scale->dim() == 2 &&
                    dora_scale->size(0) >= slots && dora_scale->size(1) == out,
                "dora_scale must be a contiguous float32 [slots (+1), out_features] tensor");
    dora = dora_scale->data_ptr<float>();
    bias_p = frugallm::bias_ptr(bias, out);
  }
  const int64_t* idx = index.data_ptr<int64_t>();
  float_or_bf16(y, "y", [&](auto* yp) {
    float_or_bf16(x, "x", [&](const auto* xp) {
      float_or_bf16(a_pool, "a_pool", [&](const auto* ap) {
        using TW = std::remove_cv_t<std::remove_pointer_t<decltype(ap)>>;
        run(yp, y.stride(0), xp, x.stride(0), ap, b_tiles.data_ptr<TW>(), idx, rk, sizes, offsets, tile0, tiles, rows,
            in, out, slots, r, dora, bias_p);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def(
      "lora_bgmv(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_tiles, Tensor index, Tensor ranks, int[] parts, "
      "Tensor? dora_scale, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) { m.impl("lora_bgmv", &lora_bgmv); }
