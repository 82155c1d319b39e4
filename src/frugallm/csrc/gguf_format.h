// The GGUF block formats shared by the gguf_* kernels: type numbers (GGMLQuantizationType), block geometry, the f16
// scalars of the blocks, and the one check of a weight's bytes against its type (ground truth: gguf/quants.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace frugallm::gguf {

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
                       Q5_K = 13, Q6_K = 14 };

struct Format {
  int64_t block, bytes;  // values per block, bytes per block
};

// {0, 0} for a type no kernel here runs.
constexpr Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q2_K: return {256, 84};
    case Q3_K: return {256, 110};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// The format of qtype, checked against a weight [rows, bytes_per_row] holding `cols` values per row. `runs`: the
// calling op runs qtype; `what` (" for int8 activations", or "") and `supported` (its types) go into the message.
inline Format check_weight(const at::Tensor& w, int64_t qtype, int64_t rows, int64_t cols, bool runs,
                           const char* what, const char* supported) {
  const Format f = format_of(qtype);
  TORCH_CHECK(runs && f.block != 0, "unsupported GGUF qtype ", qtype, what, " (supported: ", supported, ")");
  TORCH_CHECK(cols > 0 && cols % f.block == 0, "in_features (", cols, ") must be a positive multiple of ", f.block,
              " for GGUF qtype ", qtype);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "w must be a contiguous uint8 [out_features, bytes_per_row] tensor, got ", w.scalar_type(), " with ",
              w.dim(), " dims");
  TORCH_CHECK(w.size(0) == rows, "w has ", w.size(0), " rows but out_features is ", rows);
  TORCH_CHECK(w.size(1) == cols / f.block * f.bytes, "w has ", w.size(1), " bytes per row but GGUF qtype ", qtype,
              " stores ", cols, " values in ", cols / f.block * f.bytes, " bytes (", f.bytes, " per block of ",
              f.block, ")");
  return f;
}

#if defined(__AVX2__)
// Byte-level decoders of the blocks' codes (AVX2; the kernels' vector builds).
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
inline __m256i bits_at(__m256i v, int shift, int mask) {  // (v >> shift) & mask per byte
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(static_cast<char>(mask)));
}
// 16 bytes of nibbles -> 32 codes: low nibbles are values 0-15, high nibbles 16-31.
inline __m256i nibbles16(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
// 32 bits (little endian) -> 32 bytes, 0x10 where the bit is set.
inline __m256i bits32_x16(const uint8_t* p) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(h)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}
#endif

}  // namespace frugallm::gguf
