// Internal: the CUDA backend's entry points used by the shared C++ code (built only with
// KVLOOM_WITH_CUDA; the implementations are in cuda/).
#pragma once

#ifdef KVLOOM_WITH_CUDA
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "kvloom/attention.h"

namespace kvloom {
namespace detail {

// Decode attention of q [B, Hq, D] over views of a CUDA cache (decode_attention_cache, which
// validated the arguments), on q's device and the current stream; reads the device mirrors of
// the head stores' tables (uploading what changed) and never waits for the GPU. With
// `accumulate` (the caller holds a write scope), each live slot's probability, summed over its
// query group, is also added to its accumulated score: a second pass over the keys, read back
// without waiting and queued on the cache (cache::defer_scores), applied when it settles.
void cuda_attend_cache(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views,
                       const tensor_view& q, const tensor_view& out, float scale, const rope_spec& rope,
                       bool accumulate = false);
// Chunk attention of q [B, Hq, Tq, D] over a CUDA cache (chunk_attention_cache, validated):
// appended[b] is row b's logical length, mask an optional [B, Tq, K] view on q's device.
void cuda_chunk_attention(const cache& c, int layer, const std::vector<int64_t>& seqs, const std::vector<int64_t>& appended,
                          const tensor_view& q, const tensor_view* mask, float mask_threshold, const tensor_view& out,
                          float scale);
// Dense decode attention on CUDA tensors (decode_attention_dense, validated).
void cuda_attend_dense(const tensor_view& q, const std::vector<dense_segment>& segments, const tensor_view& out, float scale,
                       const rope_spec& rope);

// 4-byte words of block-table mirrors uploaded so far, all caches together (tests: what a
// decode step uploads).
int64_t cuda_table_upload_words();

// Prompt statistics over device keys without the T x T map. heads[i] lists its live keys in
// ord order at keys[first_key, first_key + n_keys); query t of row b (q [B, Hq, Tq, D]) is the
// token at ord appended - Tq + t and sees the keys with ord <= its own.
struct stat_head {
  int64_t b, h;
  int64_t first_key, n_keys;
  int64_t appended;
};
struct stat_key {
  const void* k;  // the key row (device)
  int32_t ord;
};
// out_acc[key] = the probability the key receives, summed over its head's query group and
// queries (accumulated attention). With out_near (FastGen's profiling, from the same pass):
// out_near[key] = the same sum over the queries within local_window after the key, and
// out_rows[head] = the query rows that see a key. The outputs are host arrays (filled after
// one synchronisation).
void cuda_prompt_stats(const tensor_view& q, int64_t G, dtype kv_type, int64_t D, const std::vector<stat_head>& heads,
                       const std::vector<stat_key>& keys, float scale, int64_t local_window, float* out_acc,
                       float* out_near, double* out_rows);

}  // namespace detail
}  // namespace kvloom
#endif
