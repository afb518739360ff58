// kvloom/cache.h — a paged KV cache: layers x kv heads x sequences of head_stores.
//
// head_store: the KV of one (layer, kv head, sequence). A block table maps slot s to
// block table[s / block_size], offset s % block_size. Every slot carries metadata: live
// flag, `ord` (0-based index of the token in the order it was appended to this sequence:
// the logical token index), `pos` (its RoPE position), a token class and a score for
// policies. Attention is permutation-invariant over keys, so eviction just frees a slot;
// a new token fills the lowest free slot; a block whose slots are all free goes back to
// the pool. Per-head lengths differ: that is the point.
//
// Sequences: seq_add() makes an empty one; seq_fork() makes a copy that shares every
// block (reference counts), and whichever side first writes into a shared block copies it
// (copy-on-write). seq_rollback(seq, n) forgets the last n appended tokens; seq_drop()
// releases everything. Sequence ids are never reused.
//
// Failure atomicity: every operation validates its arguments and reserves the blocks it
// needs before touching anything, so an exception (bad input, capacity_error) leaves the
// cache exactly as it was.
//
// Thread safety: structural operations (seq_add, seq_fork, seq_drop, set_policy) need
// exclusive access to the cache. Other operations on *different* sequences may run
// concurrently (the block pool locks its own state); operations on the same sequence, or
// attention over a sequence while it is being written, must be serialised by the caller.
// Hogwild!-style use: one sequence per segment (a shared prompt, finished steps, one current
// step per worker); workers append into their own segments from any threads without a
// global lock (copy-on-write of a block shared by forks is safe: the pool's reference
// counts decide who copies), then attend over views (segment lists with a RoPE delta each)
// once every append of the step has returned. The pool's free list and reference counts
// are the only shared mutable state.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvloom/block_pool.h"
#include "kvloom/policy.h"
#include "kvloom/tensor_view.h"

namespace kvloom {

constexpr uint8_t kClassSpecial = 1;  // the tokenizer's special tokens
constexpr uint8_t kClassPunct = 2;    // tokens made only of punctuation and whitespace

class head_store {
 public:
  int64_t length() const { return n_live_; }        // live tokens
  int64_t appended() const { return n_appended_; }  // tokens ever appended (logical length)
  int64_t n_slots() const { return static_cast<int64_t>(live_.size()); }
  const std::vector<block_id>& table() const { return table_; }  // [n_blocks], -1 = no block
  bool live(int64_t slot) const { return live_[slot] != 0; }
  int32_t ord(int64_t slot) const { return ord_[slot]; }
  int32_t pos(int64_t slot) const { return pos_[slot]; }
  float score(int64_t slot) const { return score_[slot]; }  // accumulated attention (H2O)
  uint8_t token_class(int64_t slot) const { return cls_[slot]; }  // kClassSpecial | kClassPunct bits
  const uint8_t* live_data() const { return live_.data(); }  // [n_slots]
  const std::vector<uint16_t>& block_live() const { return block_live_; }  // [n_blocks]
  int64_t hint() const { return hint_; }  // no table entry before this one has a free slot
  const head_plan* plan() const { return plan_.get(); }

 private:
  friend class cache;
  std::vector<block_id> table_;          // [n_blocks]
  std::vector<uint16_t> block_live_;     // [n_blocks] live slots per block
  std::vector<uint8_t> live_;            // [n_blocks * block_size]
  std::vector<int32_t> ord_;             // [n_blocks * block_size]
  std::vector<int32_t> pos_;             // [n_blocks * block_size]
  std::vector<float> score_;             // [n_blocks * block_size] attention received so far
  std::vector<uint8_t> cls_;             // [n_blocks * block_size] token-class bits
  int64_t n_live_ = 0;
  int64_t n_appended_ = 0;
  int64_t hint_ = 0;  // no block before this table index has a free slot
  std::shared_ptr<const head_plan> plan_;
};

class cache {
 public:
  cache(std::shared_ptr<block_pool> pool, int n_layers, int n_kv_heads, std::shared_ptr<const policy> pol);
  ~cache();
  cache(const cache&) = delete;
  cache& operator=(const cache&) = delete;

  int n_layers() const { return n_layers_; }
  // Cross-layer KV sharing (CLA): layer l reads the store of layer store_of[l] (an owner:
  // store_of[o] == o, o <= l). Appends go to owners only; apply_policy on a reader is a
  // no-op; everything else on a reader acts on its owner's store. Readers hold no memory.
  // Only on a cache without sequences. Default: every layer owns its store.
  void set_layer_sharing(const std::vector<int>& store_of);
  const std::vector<int>& layer_sharing() const { return layer_store_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return pool_->head_dim(); }
  int block_size() const { return pool_->block_size(); }
  dtype type() const { return pool_->type(); }
  const block_pool& pool() const { return *pool_; }
  const policy& current_policy() const { return *policy_; }

  // Sets the policy for sequences added from now on (existing heads keep their plans).
  void set_policy(std::shared_ptr<const policy> pol);
  // Overrides the policy of one layer for sequences added from now on (null: back to the
  // cache-wide policy). Used e.g. for a model's sliding-window layers.
  void set_layer_policy(int layer, std::shared_ptr<const policy> pol);

  int64_t seq_add();
  int64_t seq_fork(int64_t seq);
  void seq_drop(int64_t seq);
  // Forgets the last n appended tokens of every head of `seq` (0 <= n <= seq_length).
  void seq_rollback(int64_t seq, int64_t n);
  bool seq_exists(int64_t seq) const;
  std::vector<int64_t> seq_ids() const;
  int64_t seq_length(int64_t seq) const;  // logical tokens appended (layer 0)

  // Appends n tokens to every kv head of (layer, seq). k, v: [n_kv_heads, n, head_dim]
  // of any float dtype (converted to the pool's). positions: int32 [n], or null for
  // positions equal to the logical token index. classes: uint8 [n] token-class bits
  // (kClassSpecial, kClassPunct; used by FastGen), or null for 0.
  void append(int layer, int64_t seq, const tensor_view& k, const tensor_view& v, const tensor_view* positions,
              const tensor_view* classes = nullptr);
  // Frees the given live slots of one head (all valid and distinct, else nothing changes).
  void evict(int layer, int head, int64_t seq, const int32_t* slots, int64_t n);
  // Runs each head's plan for (layer, seq) and frees what it names; returns slots freed.
  // Heads left with scattered holes are compacted (live tokens moved into the free slots of
  // lower, exclusively owned blocks) so whole blocks go back to the pool: a policy that
  // keeps every third token really holds a third of the memory.
  int64_t apply_policy(int layer, int64_t seq);
  // Adds, to every live slot of (layer, seqs[b]), the attention probability it receives
  // from the queries q[b] [B, Hq, Tq, D] (summed over each kv head's query group and the Tq
  // queries). Query i of a row sits at logical index seq_length - Tq + i and sees only
  // slots with a smaller or equal ord (causal). This is H2O's accumulated attention.
  void accumulate_attention(int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale);
  // FastGen profiling: for each row b and kv head, the attention mass (averaged over the
  // queries q[b] [B, Hq, Tq, D] and each head's query group, causal) that the keys of each
  // nested hybrid would keep: [0] special, [1] +punctuation, [2] +frequent (the
  // ceil(r_frequent x live) slots with the highest score), [3] +local (keys within
  // local_window tokens of the query). Writes out[(b * n_kv_heads + h) * 4 + i].
  void hybrid_recovery(int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                       double r_frequent, int64_t local_window, double* out) const;
  // Replaces the plan of one head (e.g. the one FastGen chose for it after profiling).
  void set_head_plan(int layer, int head, int64_t seq, std::shared_ptr<const head_plan> plan);
  // Re-plans every head of seq with the current policy and the given statistics.
  void replan(int64_t seq, const prompt_stats* stats);

  const head_store& store(int layer, int head, int64_t seq) const;
  int64_t length(int layer, int head, int64_t seq) const { return store(layer, head, seq).length(); }

  // Copies the live tokens of one head, ordered by `ord`, into k_out/v_out [length, D]
  // (any float dtype), ord_out/pos_out int32 [length] (either may be null).
  void gather(int layer, int head, int64_t seq, const tensor_view& k_out, const tensor_view& v_out,
              const tensor_view* ord_out, const tensor_view* pos_out) const;

  // Exact bytes held: distinct live blocks referenced by this cache x block bytes.
  size_t memory_bytes() const;
  int64_t blocks_held() const;

 private:
  struct sequence {
    std::vector<head_store> heads;  // [n_layers * n_kv_heads]
  };
  sequence& seq_ref(int64_t seq);
  const sequence& seq_ref(int64_t seq) const;
  void check_layer(int layer) const;
  void check_head(int head) const;
  void release(head_store& hs);
  void free_slot(head_store& hs, int64_t slot);
  void compact(head_store& hs);
  // Validates q [B, Hq, Tq, D] against seqs for the statistics functions; returns Hq / Hkv.
  int64_t check_query_rows(int layer, const std::vector<int64_t>& seqs, const tensor_view& q) const;
  const policy& policy_for(int layer) const { return layer_policy_[layer] ? *layer_policy_[layer] : *policy_; }

  std::shared_ptr<block_pool> pool_;
  int n_layers_, n_kv_heads_;
  std::shared_ptr<const policy> policy_;
  std::vector<std::shared_ptr<const policy>> layer_policy_;  // [n_layers], null = policy_
  std::vector<int> layer_store_;                              // [n_layers]: the layer whose store it reads
  size_t hidx(int layer, int head) const { return static_cast<size_t>(layer_store_[layer]) * n_kv_heads_ + head; }
  std::vector<std::unique_ptr<sequence>> seqs_;  // index = sequence id; null once dropped
};

}  // namespace kvloom
