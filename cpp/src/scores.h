// Internal: prompt statistics over a cache's head stores, shared by the plans that rank
// tokens by attention (H2O, FastGen, Task-KV) and by the bindings. The generic statistic,
// accumulated attention, is cache::accumulate_attention.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "head_store.h"
#include "kvloom/cache.h"
#include "kvloom/tensor_view.h"

namespace kvloom {

// The ceil(ratio x n_base) slots (indices into `slots`, live slots of hs) with the highest
// score; ties keep the older token. Marks them 1 in the returned mask.
std::vector<char> top_by_score(const head_store& hs, const std::vector<int64_t>& slots, double ratio, int64_t n_base);

// A live slot's rank key for "heaviest first, the older token among equal scores": larger
// keys rank first, and keys of distinct tokens differ (ords are unique in a head). Selecting
// on these plain integers instead of comparing through the store is what keeps H2O's and
// FastGen's per-step selection cheap.
inline uint64_t heavy_key(const head_store& hs, int64_t slot) {
  uint32_t bits;
  const float sc = hs.score(slot);
  std::memcpy(&bits, &sc, 4);
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;  // float order as unsigned order
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(hs.ord(slot)));
}

// The smallest key among the `keep` largest of `keys` (0 < keep <= keys.size()); leaves keys
// in no particular order (scratch).
uint64_t kth_heaviest(std::vector<uint64_t>& keys, int64_t keep);

// The rank keys of slots[0, n) into `keys` (in slot order), and the smallest key among the
// `keep` heaviest (0 < keep <= n): a slot is one of them iff its key is >= the result.
template <class Slot>
uint64_t heavy_threshold(const head_store& hs, const Slot* slots, size_t n, int64_t keep, std::vector<uint64_t>& keys) {
  keys.resize(n);
  for (size_t i = 0; i < n; ++i) keys[i] = heavy_key(hs, slots[i]);
  thread_local std::vector<uint64_t> scratch;  // kth_heaviest reorders its input
  scratch.assign(keys.begin(), keys.end());
  return kth_heaviest(scratch, keep);
}

// FastGen profiling: for each row b and kv head, the attention mass (averaged over the
// queries q[b] [B, Hq, Tq, D] and each head's query group, causal) that the keys of each
// nested hybrid would keep: [0] special, [1] +punctuation, [2] +frequent (the
// ceil(r_frequent x live) slots with the highest score), [3] +local (keys within
// local_window tokens of the query). Writes out[(b * n_kv_heads + h) * 4 + i].
void hybrid_recovery(const cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                     double r_frequent, int64_t local_window, double* out);
// accumulate_attention followed by hybrid_recovery over the same queries, in one pass over
// their probabilities (FastGen's prompt): the scores end as accumulate_attention leaves them,
// out as hybrid_recovery then gives it.
void accumulate_with_recovery(cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                              double r_frequent, int64_t local_window, double* out);

}  // namespace kvloom
