// What the two x16 kernels share (gguf_x16.cpp: Q4_K / Q6_K; gguf_x16_b32.cpp: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
// the nibble order of a repacked column dword, the weight-size check, and the repack / unpack drivers over
// 16-row groups (each kernel supplies its per-block functions).
//
// A column dword holds, in 16-bit half s, field r (bits 4r..4r+3), the nibble of stored byte 2 r + s of 8 bytes;
// `hi` picks the bytes' high nibbles (pack_dword) and unpack_dword is its inverse (the 8 bytes' nibbles of that half).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>

#if defined(__BMI2__)
#include <immintrin.h>
#endif

namespace frugallm::x16 {

// Nibble masks of 8 stored bytes by nibble (0: low) and half s: pext gathers their 4 nibbles into bits 4r..4r+3 of
// half s of a repacked dword, pdep scatters them back.
constexpr uint64_t kNibMask[2][2] = {{0x000F000F000F000FULL, 0x0F000F000F000F00ULL},
                                     {0x00F000F000F000F0ULL, 0xF000F000F000F000ULL}};

inline uint32_t pack_dword(uint64_t bytes, int hi) {
#if defined(__BMI2__)
  return static_cast<uint32_t>(_pext_u64(bytes, kNibMask[hi][0]) | (_pext_u64(bytes, kNibMask[hi][1]) << 16));
#else
  uint32_t u = 0;
  for (int r = 0; r < 4; ++r)
    for (int s = 0; s < 2; ++s) u |= static_cast<uint32_t>((bytes >> (8 * (2 * r + s) + 4 * hi)) & 0xF) << (16 * s + 4 * r);
  return u;
#endif
}

inline uint64_t unpack_dword(uint32_t u, int hi) {
#if defined(__BMI2__)
  return _pdep_u64(u & 0xFFFF, kNibMask[hi][0]) | _pdep_u64(u >> 16, kNibMask[hi][1]);
#else
  uint64_t bytes = 0;
  for (int r = 0; r < 4; ++r)
    for (int s = 0; s < 2; ++s)
      bytes |= static_cast<uint64_t>((u >> (16 * s + 4 * r)) & 0xF) << (8 * (2 * r + s) + 4 * hi);
  return bytes;
#endif
}

// One type's repacked geometry: `stored` bytes per row per block in the file, `block` bytes per 16 rows per block.
struct Format {
  const char* type;
  int64_t stored, block;
};

// w must hold n rows (n / 16 groups) of nblocks repacked blocks.
inline void check_weight(const char* op, const at::Tensor& w, int64_t n, int64_t nblocks, const Format& f) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2,
              op, ": w must be a contiguous CPU uint8 [N / 16, bytes] tensor");
  TORCH_CHECK(n > 0 && n % 16 == 0, op, ": out_features must be a positive multiple of 16, got ", n);
  TORCH_CHECK(w.size(0) == n / 16 && w.numel() == n / 16 * nblocks * f.block, op, ": w has ", w.numel(),
              " bytes in ", w.size(0), " groups; ", n, " rows of ", nblocks, " ", f.type, " blocks take ",
              n / 16 * nblocks * f.block, " in ", n / 16);
}

// `repack` turns 16 rows' stored block (rows row_bytes apart) into one repacked block; `unpack` column c of one
// repacked block back to its stored bytes.
using RepackFn = void (*)(const uint8_t*, int64_t, uint8_t*);
using UnpackFn = void (*)(const uint8_t*, int, uint8_t*);

// uint8 [N, K / values * stored] -> [N / 16, K / values * block] (N % 16 == 0).
inline at::Tensor repack(const at::Tensor& w, const char* op, const Format& f, RepackFn fn) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              op, ": w must be CPU uint8 [N, bytes per row]");
  const int64_t n = w.size(0), row_bytes = w.size(1);
  TORCH_CHECK(n > 0 && n % 16 == 0, op, ": the row count must be a positive multiple of 16, got ", n);
  TORCH_CHECK(row_bytes > 0 && row_bytes % f.stored == 0, op, ": ", row_bytes, " bytes per row is not a whole number "
              "of ", f.stored, "-byte blocks (the size of ", f.type, " blocks)");
  const at::Tensor wc = w.contiguous();
  const int64_t nblocks = row_bytes / f.stored;
  at::Tensor out = at::empty({n / 16, nblocks * f.block}, w.options());
  const uint8_t* src = wc.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t b = 0; b < nblocks; ++b)
        fn(src + 16 * g * row_bytes + b * f.stored, row_bytes, dst + (g * nblocks + b) * f.block);
  });
  return out;
}

// The stored rows back, bit for bit: all n, or those at rows int64 [R] -> uint8 [R or N, nblocks * stored].
inline at::Tensor unpack(const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& rows, const char* op,
                         const Format& f, UnpackFn fn) {
  TORCH_CHECK(w.dim() == 2 && n > 0 && n % 16 == 0 && w.size(0) == n / 16 && w.size(1) % f.block == 0,
              op, ": w must be uint8 [N / 16, blocks * ", f.block, "] for N = ", n);
  const int64_t nblocks = w.size(1) / f.block;
  check_weight(op, w, n, nblocks, f);
  at::Tensor idx;
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->device().is_cpu(),
                op, ": rows must be a CPU int64 [R] tensor");
    idx = rows->contiguous();
  }
  const int64_t r = rows.has_value() ? idx.numel() : n;
  const int64_t* ip = rows.has_value() ? idx.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < (ip ? r : 0); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, op, ": row ", ip[i], " is out of range [0, ", n, ")");
  at::Tensor out = at::empty({r, nblocks * f.stored}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, r, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = ip ? ip[i] : i;
      for (int64_t b = 0; b < nblocks; ++b)
        fn(src + ((row / 16) * nblocks + b) * f.block, static_cast<int>(row % 16), dst + (i * nblocks + b) * f.stored);
    }
  });
  return out;
}

}  // namespace frugallm::x16
