// kvloom/cache.h — a paged KV cache: layers x kv heads x sequences of head stores.
//
// Each (layer, kv head, sequence) has its own block table into a shared block_pool, so
// heads hold different numbers of tokens and eviction frees real memory. Every slot keeps
// the token's `ord` (its 0-based index in append order: the logical token index), its RoPE
// `pos`, a class byte and an accumulated-attention score. Attention is permutation
// invariant over keys, so eviction just frees a slot; a new token fills the lowest free
// slot; a block whose slots are all free goes back to the pool.
//
// Sequences: seq_add() makes an empty one; seq_fork() makes a copy that shares every
// block (reference counts), and whichever side first writes into a shared block copies it
// (copy-on-write). seq_rollback(seq, n) forgets the last n appended tokens; seq_drop()
// releases everything. Sequence ids are never reused.
//
// Ownership: a cache shares ownership of its pool (several caches may share one pool) and
// owns its sequences; dropping the cache releases every block it holds.
//
// Failure atomicity: every operation validates its arguments and reserves the blocks it
// needs before touching anything, so an exception (bad input, capacity_error) leaves the
// cache exactly as it was.
//
// Thread safety (enforced): operations on *different* sequences run concurrently from any
// threads (the block pool locks its own state; the sequence table is shared, not locked, by
// them). On one sequence, writers (append, evict, apply_policy, rollback, set_head_plan,
// accumulate_attention) exclude every other use, readers (attention, gather, inspection) may
// overlap each other: a collision throws concurrent_use_error, naming both operations, from
// the operation that noticed it, which did nothing; memory is never corrupted. Structural
// operations (seq_add, seq_fork, seq_drop, set_plan, set_layer_plan, set_layer_sharing,
// memory_bytes, blocks_held) wait for the operations in progress and run alone, so a fork
// racing with appends to its source sees the source before or after an append, never half
// of it. Hogwild!-style use: one sequence per segment (a shared prompt, finished steps, one
// current step per worker); workers append into their own segments from any threads (copy-
// on-write of a block shared by forks is safe: the pool's reference counts decide who
// copies), then attend over views (segment lists with a RoPE delta each) once every append
// of the step has returned.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "kvloom/block_pool.h"
#include "kvloom/plan.h"
#include "kvloom/tensor_view.h"

namespace kvloom {
namespace detail {
struct deferred_scores;  // deferred.h (internal)
}  // namespace detail

struct head_store;  // internal (kvloom's kernels and plans read it)

// One live slot of a head, as listed by cache::live_slots.
struct slot_info {
  int32_t slot;   // index into the head's block table (slot / block_size, slot % block_size)
  int32_t ord;    // logical token index
  int32_t pos;    // RoPE position
  uint8_t cls;    // class byte (token-class bits or NAtS type)
  float score;    // accumulated attention (see accumulate_attention)
};

class cache {
 public:
  // `plan` is the default plan of every head of new sequences (null: "full").
  cache(std::shared_ptr<block_pool> pool, int n_layers, int n_kv_heads, std::shared_ptr<const head_plan> plan = nullptr);
  ~cache();
  cache(const cache&) = delete;
  cache& operator=(const cache&) = delete;

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return pool_->head_dim(); }
  int block_size() const { return pool_->block_size(); }
  dtype type() const { return pool_->type(); }
  const block_pool& pool() const { return *pool_; }

  // Cross-layer KV sharing (CLA): layer l reads the store of layer store_of[l] (an owner:
  // store_of[o] == o, o <= l). Appends go to owners only; apply_policy on a reader is a
  // no-op; everything else on a reader acts on its owner's store. Readers hold no memory.
  // Only on a cache without sequences. Default: every layer owns its store.
  void set_layer_sharing(const std::vector<int>& store_of);
  const std::vector<int>& layer_sharing() const { return layer_store_; }

  // Quantized storage (KIVI at block granularity, kvloom/quant.h): blocks whose slots are all
  // live are quantized into `sealed` (a quantized pool of this cache's head_dim and block_size,
  // host memory) when an append no longer writes them and at the end of apply_policy (after
  // the plan's evictions and compaction), so a plan's prompt eviction runs on full-precision
  // K/V; new tokens land in full-precision blocks only (2 bits also keep each head's first block
  // and the full block holding its newest token there: quant_layout::keep_first/keep_newest;
  // compaction packs full-precision rows when that fills a block to seal). Each token is quantized once: sealed
  // blocks are never rewritten or moved (compaction moves full-precision rows only), their
  // evicted slots just die, and a sealed block returns to its pool with its last token. When
  // the quantized pool is full, blocks stay in full precision (no error). Appends to a
  // quantized cache need finite K/V within fp16's range. Only on a cache without sequences.
  void set_quantized(std::shared_ptr<block_pool> sealed);
  const block_pool* sealed_pool() const { return qpool_.get(); }

  // The default plan for sequences added from now on (existing heads keep their plans).
  void set_plan(std::shared_ptr<const head_plan> plan);
  const head_plan& default_plan() const { return *plan_; }
  // Overrides the default plan of one layer for sequences added from now on (null: back to
  // the cache-wide plan). Used e.g. for a model's sliding-window layers.
  void set_layer_plan(int layer, std::shared_ptr<const head_plan> plan);
  // Replaces the plan of one head (e.g. the hybrid FastGen's profiling chose for it).
  void set_head_plan(int layer, int head, int64_t seq, std::shared_ptr<const head_plan> plan);

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
  // positions equal to the logical token index. classes: uint8 [n] (one class byte per
  // token, every head) or [n_kv_heads, n] (per head, e.g. NAtS types), or null for 0.
  void append(int layer, int64_t seq, const tensor_view& k, const tensor_view& v, const tensor_view* positions,
              const tensor_view* classes = nullptr);
  // Frees the given live slots of one head (all valid and distinct, else nothing changes).
  void evict(int layer, int head, int64_t seq, const int32_t* slots, int64_t n);
  // Runs each head's plan for (layer, seq) and frees what it names; returns slots freed.
  // Heads left with scattered holes are compacted (live tokens moved into the free slots of
  // lower, exclusively owned blocks) so whole blocks go back to the pool: a plan that
  // keeps every third token really holds a third of the memory. Then the byte budget, if
  // set (set_budget): `full_tokens` is what Full would hold per head of this layer (-1: the
  // tokens appended).
  int64_t apply_policy(int layer, int64_t seq, int64_t full_tokens = -1);

  // A byte budget (kv_budget): after a layer's plans ran, the blocks one sequence holds in that
  // layer (its float and sealed blocks, shared ones included) may take at most
  // budget_bytes(full_tokens) = max(floor(fraction x n_kv_heads x ceil(full_tokens / block_size) x
  // float block bytes), n_kv_heads x (float block bytes [+ sealed block bytes])): `fraction` of
  // what Full holds in this cache's float dtype and block size, never less than one open block per head (and one sealed
  // block per head in a quantized cache). While more is held, live tokens of
  // the layer's heads give way in the order of their plans' keys (give_way_key, plan.h); a
  // sealed block goes as a unit (its tokens share one key, the largest of theirs), a float
  // token alone, until the bytes the layer will hold after compaction and sealing fit; each
  // head's newest token stays. 0 = no budget (the default). Settable at any time; it acts at
  // the next apply_policy.
  void set_budget(double fraction);
  double budget() const { return budget_.load(); }
  size_t budget_bytes(int64_t full_tokens) const;
  // The budget rule's key of each live slot of one head, in slot order.
  std::vector<give_way_key> give_way_keys(int layer, int head, int64_t seq) const;
  // What the budget chooses from, for one layer of one sequence as it stands: every float token
  // and every sealed block that may give way (a sealed block only whole, keyed by its last token
  // to give way; each head's newest token never), sorted in give-way order (key, then ord, head,
  // index), each with the bytes its going takes off the layer's projected size: what the layer
  // holds once its float tokens are packed into blocks and full ones sealed (`*projected`). A
  // float token frees a block only when its head's float tokens fit in one block fewer. The
  // budget takes units in this order until the projection fits; under tensor parallelism
  // kvloom.Cache merges the units of every rank (heads renumbered) and walks them the same way.
  struct budget_unit {
    give_way_key key;
    int32_t ord;    // of the slot (a sealed block: of the slot that gave the key)
    int head;
    int64_t index;  // the slot, or for a sealed block its table entry
    bool block;
    size_t frees;   // bytes off the projection, taken after the units before it of its head
  };
  std::vector<budget_unit> budget_units(int layer, int64_t seq, size_t* projected) const;
  // Evicts the named units (head, index, block) of one layer of one sequence, then compacts and
  // seals the heads touched; returns the slots freed.
  int64_t give_way(int layer, int64_t seq, const std::vector<budget_unit>& units);
  // Bytes of the blocks one layer of one sequence holds (all its heads, at their pools' sizes).
  size_t layer_bytes(int layer, int64_t seq) const;
  // Adds, to every live slot of (layer, seqs[b]), the attention probability it receives
  // from the queries q[b] [B, Hq, Tq, D] (summed over each kv head's query group and the Tq
  // queries). Query i of a row sits at logical index seq_length - Tq + i and sees only
  // slots with a smaller or equal ord (causal). This is H2O's accumulated attention.
  void accumulate_attention(int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale);

  // Inspection.
  int64_t length(int layer, int head, int64_t seq) const;        // live tokens of one head
  std::vector<slot_info> live_slots(int layer, int head, int64_t seq) const;  // in slot order
  std::vector<block_id> block_table(int layer, int head, int64_t seq) const;  // -1 = hole
  // Per block-table entry: 1 where the block is sealed (quantized pool), else 0.
  std::vector<uint8_t> sealed_entries(int layer, int head, int64_t seq) const;
  std::string plan_name(int layer, int head, int64_t seq) const;  // the head's plan (short name)
  // Copies the live tokens of one head, ordered by `ord`, into k_out/v_out [length, D]
  // (any float dtype), ord_out/pos_out int32 [length] (either may be null).
  void gather(int layer, int head, int64_t seq, const tensor_view& k_out, const tensor_view& v_out,
              const tensor_view* ord_out, const tensor_view* pos_out) const;

  // Snapshots. export_sequences: the sequences' live blocks (in the storage format, shared
  // blocks once) with all slot metadata and plans, as bytes (format: src/snapshot.cpp, README);
  // a reader of each sequence. import_sequences: validates the whole blob against this cache
  // (geometry, layer sharing, every count, index and plan) before it changes anything, takes
  // every block at once (capacity_error: nothing taken), then adds the sequences and returns
  // their ids in the blob's order: fresh ids, or with keep_ids the saved ones (which must be
  // beyond every id this cache has given out). Bad blobs throw std::invalid_argument; the
  // blob carries no checksum (the Python snapshot file adds one). Structural (runs alone).
  std::vector<uint8_t> export_sequences(const std::vector<int64_t>& seqs) const;
  std::vector<int64_t> import_sequences(const uint8_t* data, size_t size, bool keep_ids = false);

  // Exact bytes held: distinct live blocks referenced by this cache x block bytes (each
  // pool's: full-precision and sealed blocks).
  size_t memory_bytes() const;
  int64_t blocks_held() const;

  // Marks sequences as used by `op` for a scope (and shares the sequence table): readers may
  // overlap each other, a writer excludes everything; throws concurrent_use_error (marking
  // nothing) when another thread's use collides. kvloom's kernels read head stores inside one.
  class use_scope {
   public:
    use_scope(const cache& c, std::vector<int64_t> seqs, bool write, const char* op);
    ~use_scope();
    use_scope(const use_scope&) = delete;
    use_scope& operator=(const use_scope&) = delete;

   private:
    std::shared_lock<std::shared_mutex> lock_;
    std::vector<std::atomic<int32_t>*> marked_;
    bool write_;
  };

  // For kvloom's own kernels, inside a use_scope (the head_store type is internal).
  const head_store& store(int layer, int head, int64_t seq) const;
  // For kvloom's CUDA backend: queues a decode step's accumulated-attention update of `layer`'s
  // stores (read back without waiting for the GPU). settle_scores(layer) applies the queued
  // updates of that layer (-1: of every layer); every operation that reads scores or changes
  // slots calls it first, inside its use_scope: the operations naming a layer settle that
  // layer, fork, drop, rollback and export settle all of them. Until then nothing can tell.
  void defer_scores(int layer, std::shared_ptr<detail::deferred_scores> update) const;
  void settle_scores(int layer) const;
  // Validates q [B, Hq, Tq, D] against seqs for the statistics functions; returns Hq / Hkv.
  // (Inside a use_scope.)
  int64_t check_query_rows(int layer, const std::vector<int64_t>& seqs, const tensor_view& q) const;

 private:
  struct sequence;
  void evict_unlocked(int layer, int head, int64_t seq, const int32_t* slots, int64_t n);
  std::pair<size_t, size_t> blocks_held_unlocked() const;  // distinct blocks: (full precision, sealed)
  sequence& seq_ref(int64_t seq);
  const sequence& seq_ref(int64_t seq) const;
  head_store& mutable_store(int layer, int head, int64_t seq);
  void check_layer(int layer) const;
  void check_head(int head) const;
  void release(head_store& hs);
  void free_slot(head_store& hs, int64_t slot, std::vector<block_id>* released = nullptr);
  void compact(head_store& hs);
  // Quantizes the full-precision blocks of hs whose slots are all live (skip: entries to leave).
  void seal_full(head_store& hs, const std::vector<uint8_t>* skip = nullptr);
  void check_quantizable(const tensor_view& k, const tensor_view& v) const;
  // The budget's evictions for (layer, seq) after its plans ran; returns slots freed.
  int64_t enforce_budget(int layer, sequence& s, int64_t seq, int64_t full_tokens);
  std::vector<budget_unit> budget_units_unlocked(int layer, const sequence& s, size_t* projected) const;
  int64_t give_way_unlocked(int layer, sequence& s, int64_t seq, const std::vector<budget_unit>& units);
  size_t layer_bytes_unlocked(int layer, const sequence& s) const;
  size_t head_bytes(const head_store& hs) const;  // blocks held by one head, at their pools' sizes
  block_pool& pool_of(const head_store& hs, size_t entry) const;
  const std::shared_ptr<const head_plan>& plan_for(int layer) const {
    return layer_plan_[layer] ? layer_plan_[layer] : plan_;
  }
  size_t hidx(int layer, int head) const { return static_cast<size_t>(layer_store_[layer]) * n_kv_heads_ + head; }

  std::shared_ptr<block_pool> pool_;
  std::shared_ptr<block_pool> qpool_;  // quantized storage (set_quantized), or null
  int n_layers_, n_kv_heads_;
  std::shared_ptr<const head_plan> plan_;
  std::vector<std::shared_ptr<const head_plan>> layer_plan_;  // [n_layers], null = plan_
  std::vector<int> layer_store_;                              // [n_layers]: the layer whose store it reads
  std::vector<std::unique_ptr<sequence>> seqs_;               // index = sequence id; null once dropped
  std::atomic<double> budget_{0.0};   // set_budget; 0 = none
  mutable std::shared_mutex seqs_mu_;  // shared by per-sequence operations, exclusive for structural ones
  mutable std::mutex deferred_mu_;     // guards deferred_ and applying its updates
  mutable std::vector<std::shared_ptr<detail::deferred_scores>> deferred_;  // in the order queued
  mutable std::atomic<int> n_deferred_{0};
};

}  // namespace kvloom
