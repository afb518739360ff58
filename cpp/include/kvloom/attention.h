// kvloom/attention.h — single-token decode attention on the CPU.
//
// One query token per batch row attends over keys/values that are either dense tensors
// or a cache's head_stores. GQA-aware: each kv head is read once for its whole query
// group (Hq / Hkv query heads); softmax is computed online in fp32 whatever the storage
// dtype (fp32/fp16/bf16); work is split over (batch, kv head, key range) across threads
// and partial softmax states are merged.
//
// Segments and RoPE: the keys a query sees may come in several segments (Hogwild!
// views). Keys are stored rotated at segment-local positions; segment s carries an angle
// offset delta_s = own_offset - segment_offset, and the kernel rotates the query by
// delta_s (angles delta_s * inv_freq[i], rotate-half convention, first 2*n_freq dims)
// instead of re-rotating keys. With no rope (n_freq == 0) deltas must be 0.
//
// Thread safety: reads only; callers must not write the attended sequences concurrently.
// Failure atomicity: arguments are validated before anything is written to `out`.
#pragma once

#include <cstdint>
#include <vector>

#include "kvloom/cache.h"
#include "kvloom/quant.h"
#include "kvloom/tensor_view.h"

namespace kvloom {

struct rope_spec {
  const float* inv_freq = nullptr;  // [n_freq]
  int n_freq = 0;
};

// One dense segment: k, v [B, Hkv, T_s, D]; delta [B] int64 angle offsets (null: 0).
struct dense_segment {
  tensor_view k, v;
  const int64_t* delta = nullptr;
};

// q [B, Hq, D], out [B, Hq, D]; scale <= 0 means 1/sqrt(D).
void decode_attention_dense(const tensor_view& q, const std::vector<dense_segment>& segments,
                            const tensor_view& out, float scale, const rope_spec& rope);

// Decode attention over quantized K/V (kvloom/quant.h): blocks uint8 [B, Hkv, n_blocks, L.bytes]
// holding T tokens per (row, kv head); q [B, Hq, D], out [B, Hq, D]; CPU. Each block is
// dequantized into a cache-sized scratch right before the fp32 kernel reads it.
void decode_attention_quantized(const tensor_view& q, const tensor_view& blocks, int64_t T, const quant_layout& L,
                                const tensor_view& out, float scale);

// One segment of a sequence's view over the cache: sequence `seq` seen at angle offset delta.
struct cache_segment {
  int64_t seq;
  int64_t delta = 0;
};

// q [B, Hq, D] for `layer`; views[b] lists the segments row b attends to.
void decode_attention_cache(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views,
                            const tensor_view& q, const tensor_view& out, float scale, const rope_spec& rope);

// Decode attention of q [B, Hq, D] over (layer, seqs[b]) (one sequence per row, no rotation)
// that also adds to each live slot the attention it receives, summed over its kv head's query
// group: decode_attention_cache then cache::accumulate_attention (H2O's and FastGen's
// statistic), in one pass over the keys on a CPU cache (two on a CUDA one, and one wait for the
// GPU: the scores are host metadata). A writer on those
// sequences; they must be distinct and non-empty.
void decode_attention_accumulate(cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q,
                                 const tensor_view& out, float scale);

// Attention of a chunk of Tq query tokens per row over the cache (chunked prefill, a continued
// conversation, a side path's instruction): q [B, Hq, Tq, D] for `layer`; row b reads
// (layer, seqs[b]), whose last Tq appended tokens are the chunk itself. Query t of row b is the
// token at ord appended - Tq + t and sees the live keys with a smaller or equal ord (causal by
// ord, whatever evictions left) that `mask` allows: an optional [B, Tq, K] view (K > every ord;
// uint8/bool: nonzero = visible; float: an additive mask, visible where > half the dtype's
// minimum) indexed by ord, i.e. transformers' attention mask. out [B, Hq, Tq, D] (any float
// dtype and strides); a query that sees no key gets zeros. q, mask and out live on the cache's
// device (CPU or CUDA).
void chunk_attention_cache(const cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q,
                           const tensor_view* mask, const tensor_view& out, float scale);

// Threads used by the kernels (default: hardware concurrency, or KVLOOM_NUM_THREADS).
void set_num_threads(int n);
int get_num_threads();
// Name of the kernel path chosen at run time ("avx512", "avx2" or "generic").
const char* kernel_isa();

}  // namespace kvloom
