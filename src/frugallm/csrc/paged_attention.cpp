// Paged decode attention on CPU: one-token queries attend over keys/values read in place from a paged
// pool (no gather into a contiguous copy). Registered as torch.ops.frugallm.paged_decode_attention.
//
// Why a kernel: the torch path gathers each row's blocks into a contiguous [B, Hk, S, D] copy and runs
// SDPA on it, reading and writing the visible KV twice per layer; SDPA's CPU kernel is also 4-10x slower
// on half-precision keys for one-token queries, which forces an fp32 pool. This kernel reads each key and
// value once, in the pool's dtype (fp32, bf16 or fp16), converting to fp32 in registers, and serves the
// query heads of a GQA group from one read of their shared key/value head. paged_decode_attention_lse also
// returns each query head's log-sum-exp of scores, so a caller can merge it with attention over other keys
// (KIVI-packed chunks: kivi_attention.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
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

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return frugallm::bf16_to_float(x.x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

using frugallm::exp_nonpositive;

// A task is one sequence and a run of its kv heads with their GQA query groups. With enough sequences to
// go round the threads, a task takes all of a sequence's heads, so it streams each token's contiguous row
// ([kv_heads, head_dim]) through whole blocks; with fewer (a single stream), one head per task, to use
// every thread. HEAD_DIM > 0 fixes the head size at compile time (unrolled loops); 0 reads it at run time.
template <typename T, int HEAD_DIM>
void decode_attention(const float* q, const T* k_pool, const T* v_pool, const int64_t* tables,
                      const int64_t* lens, float* out, float* lse, int64_t batch, int64_t q_heads, int64_t kv_heads,
                      int64_t head_dim_rt, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : head_dim_rt;
  const int64_t group = q_heads / kv_heads;
  const int64_t token_stride = kv_heads * head_dim;  // pool layout [blocks, block_size, kv_heads, head_dim]
  const int64_t block_stride = block_size * token_stride;
  const int64_t task_heads = batch >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t task_qheads = task_heads * group;  // adjacent query heads: h0 * group ...
  const int64_t chunks = kv_heads / task_heads;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row(head_dim), qs(task_qheads * head_dim), vblock(block_size * task_heads * head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, h0 = (task % chunks) * task_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      const float* qb = q + (b * q_heads + h0 * group) * head_dim;
      float* o = out + (b * q_heads + h0 * group) * head_dim;
      scores.resize(task_qheads * len);
      for (int64_t i = 0; i < task_qheads * head_dim; ++i) qs[i] = qb[i] * scale;
      // Calls fn(rows, s0, n, next) per block: rows = its first token's keys or values (heads h0..), tokens
      // s0..s0+n-1, one every token_stride elements; next = the next block's rows or null. Blocks are
      // scattered, so the hardware prefetcher stops at each block's end: fn prefetches row j of the next
      // block as it uses row j of this one (the kernel is otherwise memory-latency bound: 2x slower from
      // DRAM; prefetching a whole block at once is slower than spreading it).
      const int64_t row_bytes = task_heads * head_dim * static_cast<int64_t>(sizeof(T));
      const auto for_each_block = [&](const T* pool, auto&& fn) {
        for (int64_t blk = 0; blk < num_blocks; ++blk) {
          const T* next = blk + 1 < num_blocks ? pool + table[blk + 1] * block_stride + h0 * head_dim : nullptr;
          fn(pool + table[blk] * block_stride + h0 * head_dim, blk * block_size,
             std::min(block_size, len - blk * block_size), next);
        }
      };
      const auto prefetch_row = [&](const T* next, int64_t j) {
        if (next == nullptr) return;
        const char* r = reinterpret_cast<const char*>(next + j * token_stride);
        for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(r + c);
      };
      // Scores: each key row is converted once and serves its whole query group.
      for_each_block(k_pool, [&](const T* rows, int64_t s0, int64_t n, const T* next) {
        for (int64_t j = 0; j < n; ++j) {
          prefetch_row(next, j);
          for (int64_t hh = 0; hh < task_heads; ++hh) {
            const T* k = rows + j * token_stride + hh * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(k[d]);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t i = hh * group + g;
              const float* qi = qs.data() + i * head_dim;
              float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
              for (int64_t d = 0; d < head_dim; ++d) acc += qi[d] * row[d];
              scores[i * len + s0 + j] = acc;
            }
          }
        }
      });
      // Softmax per query head.
      for (int64_t i = 0; i < task_qheads; ++i) {
        float* si = scores.data() + i * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < len; ++s) mx = std::max(mx, si[s]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < len; ++s) {
          si[s] = exp_nonpositive(si[s] - mx);
          sum += si[s];
        }
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < len; ++s) si[s] *= inv;
        if (lse != nullptr) lse[b * q_heads + h0 * group + i] = mx + std::log(sum);
      }
      // Weighted sum of values, a block at a time: its rows are converted to fp32 once (prefetching the
      // next block's as they go), then each query head's output stays in registers across the block's
      // tokens (with HEAD_DIM known) instead of a load and a store per token.
      std::fill(o, o + task_qheads * head_dim, 0.0f);
      for_each_block(v_pool, [&](const T* rows, int64_t s0, int64_t n, const T* next) {
        const int64_t width = task_heads * head_dim;
        for (int64_t j = 0; j < n; ++j) {
          prefetch_row(next, j);
          const T* v = rows + j * token_stride;
          for (int64_t d = 0; d < width; ++d) vblock[j * width + d] = to_float(v[d]);
        }
        for (int64_t hh = 0; hh < task_heads; ++hh) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t i = hh * group + g;
            const float* pi = scores.data() + i * len + s0;
            const float* vb = vblock.data() + hh * head_dim;
            float* oi = o + i * head_dim;
            if constexpr (HEAD_DIM > 0) {
              float acc[HEAD_DIM];
              for (int64_t d = 0; d < HEAD_DIM; ++d) acc[d] = oi[d];
              for (int64_t j = 0; j < n; ++j)
                for (int64_t d = 0; d < HEAD_DIM; ++d) acc[d] += pi[j] * vb[j * width + d];
              for (int64_t d = 0; d < HEAD_DIM; ++d) oi[d] = acc[d];
            } else {
              for (int64_t j = 0; j < n; ++j)
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) oi[d] += pi[j] * vb[j * width + d];
            }
          }
        }
      });
    }
  });
}

template <typename T>
void dispatch_head_dim(const float* q, const T* k_pool, const T* v_pool, const int64_t* tables,
                       const int64_t* lens, float* out, float* lse, int64_t batch, int64_t q_heads, int64_t kv_heads,
                       int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  switch (head_dim) {
    case 64:
      return decode_attention<T, 64>(q, k_pool, v_pool, tables, lens, out, lse, batch, q_heads, kv_heads, head_dim,
                                     block_size, max_blocks, scale);
    case 128:
      return decode_attention<T, 128>(q, k_pool, v_pool, tables, lens, out, lse, batch, q_heads, kv_heads, head_dim,
                                      block_size, max_blocks, scale);
    default:
      return decode_attention<T, 0>(q, k_pool, v_pool, tables, lens, out, lse, batch, q_heads, kv_heads, head_dim,
                                    block_size, max_blocks, scale);
  }
}

// out [batch, q_heads, head_dim]; lse (a [batch, q_heads] float32 tensor, or undefined) gets the log-sum-exps.
void paged_decode_attention_into(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                 at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [batch, q_heads, head_dim] tensor");
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type(),
              "k_pool and v_pool must be contiguous [blocks, block_size, kv_heads, head_dim] of one dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be a contiguous int64 [batch, max_blocks] tensor");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(),
              "context_lens must be a contiguous int64 [batch] tensor");
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_pool.size(1), kv_heads = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == head_dim && q_heads % kv_heads == 0, "q heads/head_dim do not match the pool");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch, "batch sizes differ");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "context length out of the block table");
  out = at::empty({batch, q_heads, head_dim}, q.options());
  float* lp = lse.defined() ? (lse = at::empty({batch, q_heads}, q.options())).data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale);
  switch (k_pool.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(),
                       block_tables.data_ptr<int64_t>(), lens, out.data_ptr<float>(), lp, batch, q_heads, kv_heads,
                       head_dim, block_size, max_blocks, s);
      break;
    case at::kBFloat16:
      dispatch_head_dim(q.data_ptr<float>(), k_pool.data_ptr<c10::BFloat16>(), v_pool.data_ptr<c10::BFloat16>(),
                       block_tables.data_ptr<int64_t>(), lens, out.data_ptr<float>(), lp, batch, q_heads, kv_heads,
                       head_dim, block_size, max_blocks, s);
      break;
    case at::kHalf:
      dispatch_head_dim(q.data_ptr<float>(), k_pool.data_ptr<c10::Half>(), v_pool.data_ptr<c10::Half>(),
                       block_tables.data_ptr<int64_t>(), lens, out.data_ptr<float>(), lp, batch, q_heads, kv_heads,
                       head_dim, block_size, max_blocks, s);
      break;
    default:
      TORCH_CHECK(false, "unsupported pool dtype ", k_pool.scalar_type());
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  at::Tensor out, lse;
  paged_decode_attention_into(q, k_pool, v_pool, block_tables, context_lens, scale, out, lse);
  return out;
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention_lse(const at::Tensor& q, const at::Tensor& k_pool,
                                                              const at::Tensor& v_pool, const at::Tensor& block_tables,
                                                              const at::Tensor& context_lens, double scale) {
  at::Tensor out, lse = at::empty({0}, q.options());
  paged_decode_attention_into(q, k_pool, v_pool, block_tables, context_lens, scale, out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(frugallm, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_decode_attention_lse(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(frugallm, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_attention_lse", &paged_decode_attention_lse);
}
