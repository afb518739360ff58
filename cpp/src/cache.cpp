#include "kvloom/cache.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

#include "device.h"
#include "deferred.h"
#include "head_store.h"
#include "sequence.h"
#include "plans/plan_impl.h"

namespace kvloom {

cache::use_scope::use_scope(const cache& c, std::vector<int64_t> seqs, bool write, const char* op)
    : lock_(c.seqs_mu_), write_(write) {
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  try {
    for (int64_t id : seqs) {
      sequence& s = const_cast<sequence&>(c.seq_ref(id));
      int32_t cur = s.users.load(std::memory_order_acquire);
      for (;;) {
        if (cur < 0 || (write && cur > 0)) {
          const char* other = s.op.load(std::memory_order_relaxed);
          throw concurrent_use_error(std::string(op) + " on sequence " + std::to_string(id) + " collided with " +
                                     (other ? other : "another operation") + " running on it in another thread (" +
                                     (cur < 0 ? "a write" : "a read") + "); operations on one sequence must not overlap "
                                     "with a write to it (different sequences may run concurrently); nothing was done");
        }
        if (s.users.compare_exchange_weak(cur, write ? -1 : cur + 1, std::memory_order_acq_rel)) break;
      }
      s.op.store(op, std::memory_order_relaxed);
      marked_.push_back(&s.users);
    }
  } catch (...) {
    for (auto* m : marked_) {
      if (write) m->store(0, std::memory_order_release);
      else m->fetch_sub(1, std::memory_order_acq_rel);
    }
    throw;
  }
}

cache::use_scope::~use_scope() {
  for (auto* m : marked_) {
    if (write_) m->store(0, std::memory_order_release);
    else m->fetch_sub(1, std::memory_order_acq_rel);
  }
}

namespace {

// Where one head's append lands: slots to write and which table entries get new blocks.
struct append_plan {
  std::vector<int64_t> slots;          // [n] target slot per token
  std::vector<int64_t> cow_entries;    // existing shared blocks to copy before writing
  std::vector<int64_t> hole_entries;   // table holes that receive a fresh block
  int64_t new_entries = 0;             // blocks appended to the table
  int64_t last_entry = 0;              // hint after the append
  int64_t blocks_needed() const {
    return static_cast<int64_t>(cow_entries.size() + hole_entries.size()) + new_entries;
  }
};

}  // namespace

cache::cache(std::shared_ptr<block_pool> pool, int n_layers, int n_kv_heads, std::shared_ptr<const head_plan> plan)
    : pool_(std::move(pool)), n_layers_(n_layers), n_kv_heads_(n_kv_heads), plan_(std::move(plan)) {
  if (!pool_) fail_value("cache: pool must not be null");
  if (n_layers <= 0) fail_value("cache: n_layers must be >= 1, got " + std::to_string(n_layers));
  if (n_kv_heads <= 0) fail_value("cache: n_kv_heads must be >= 1, got " + std::to_string(n_kv_heads));
  if (!plan_) plan_ = make_plan("full");
  layer_plan_.resize(static_cast<size_t>(n_layers));
  layer_store_.resize(static_cast<size_t>(n_layers));
  for (int l = 0; l < n_layers; ++l) layer_store_[l] = l;
}

void cache::set_layer_sharing(const std::vector<int>& store_of) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  if (static_cast<int>(store_of.size()) != n_layers_)
    fail_value("layer sharing needs one entry per layer (" + std::to_string(n_layers_) + "), got " +
               std::to_string(store_of.size()));
  for (int l = 0; l < n_layers_; ++l) {
    const int o = store_of[l];
    if (o < 0 || o > l)
      fail_value("layer " + std::to_string(l) + " cannot read layer " + std::to_string(o) +
                 "'s KV: the owner must be the same or an earlier layer");
    if (store_of[o] != o)
      fail_value("layer " + std::to_string(o) + " is named as an owner but itself reads layer " +
                 std::to_string(store_of[o]));
  }
  for (const auto& sq : seqs_)
    if (sq) fail_value("layer sharing can only be set on a cache without sequences");
  layer_store_ = store_of;
}

block_pool& cache::pool_of(const head_store& hs, size_t entry) const { return hs.sealed(entry) ? *qpool_ : *pool_; }

void cache::set_quantized(std::shared_ptr<block_pool> sealed) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  if (sealed) {
    if (!sealed->quant()) fail_value("set_quantized: the pool must be a quantized pool (quant_bits 8, 4 or 2)");
    if (sealed->head_dim() != pool_->head_dim() || sealed->block_size() != pool_->block_size())
      fail_value("set_quantized: the quantized pool's head_dim/block_size (" + std::to_string(sealed->head_dim()) + "/" +
                 std::to_string(sealed->block_size()) + ") must equal the cache's (" + std::to_string(pool_->head_dim()) +
                 "/" + std::to_string(pool_->block_size()) + ")");
    if (sealed->device() != pool_->device() || sealed->device_id() != pool_->device_id())
      fail_value("set_quantized: the quantized pool must be on the cache's device");
  }
  for (const auto& sq : seqs_)
    if (sq) fail_value("quantized storage can only be set on a cache without sequences");
  qpool_ = std::move(sealed);
}

cache::~cache() {
  deferred_.clear();  // updates never applied: each waits for its copy, then frees its buffer
  for (auto& s : seqs_)
    if (s)
      for (auto& hs : s->heads) release(hs);
}

void cache::defer_scores(int layer, std::shared_ptr<detail::deferred_scores> update) const {
  check_layer(layer);
  update->store_layer = layer_store_[layer];
  std::lock_guard<std::mutex> lock(deferred_mu_);
  deferred_.push_back(std::move(update));
  n_deferred_.fetch_add(1, std::memory_order_release);
}

void cache::settle_scores(int layer) const {
  if (n_deferred_.load(std::memory_order_acquire) == 0) return;
  const int store_layer = layer < 0 ? -1 : layer_store_[layer];
  std::lock_guard<std::mutex> lock(deferred_mu_);
  std::vector<std::shared_ptr<detail::deferred_scores>> due;
  size_t kept = 0;
  for (auto& d : deferred_) {
    if (store_layer < 0 || d->store_layer == store_layer) due.push_back(std::move(d));
    else deferred_[kept++] = std::move(d);
  }
  deferred_.resize(kept);
  n_deferred_.store(static_cast<int>(kept), std::memory_order_release);
  for (auto& d : due) d->apply();  // in the order queued (a throw drops the rest: a CUDA error)
}

void cache::set_plan(std::shared_ptr<const head_plan> plan) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  if (!plan) fail_value("cache: plan must not be null");
  plan_ = std::move(plan);
}

void cache::set_layer_plan(int layer, std::shared_ptr<const head_plan> plan) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  check_layer(layer);
  layer_plan_[layer] = std::move(plan);
}

void cache::check_layer(int layer) const {
  if (layer < 0 || layer >= n_layers_)
    fail_index("layer " + std::to_string(layer) + " out of range [0, " + std::to_string(n_layers_) + ")");
}

void cache::check_head(int head) const {
  if (head < 0 || head >= n_kv_heads_)
    fail_index("kv head " + std::to_string(head) + " out of range [0, " + std::to_string(n_kv_heads_) + ")");
}

cache::sequence& cache::seq_ref(int64_t seq) {
  return const_cast<sequence&>(static_cast<const cache*>(this)->seq_ref(seq));
}

const cache::sequence& cache::seq_ref(int64_t seq) const {
  if (seq < 0 || seq >= static_cast<int64_t>(seqs_.size()) || !seqs_[seq])
    fail_index("sequence " + std::to_string(seq) + " does not exist (never added, or dropped)");
  return *seqs_[seq];
}

bool cache::seq_exists(int64_t seq) const {
  std::shared_lock<std::shared_mutex> lock(seqs_mu_);
  return seq >= 0 && seq < static_cast<int64_t>(seqs_.size()) && seqs_[seq];
}

std::vector<int64_t> cache::seq_ids() const {
  std::shared_lock<std::shared_mutex> lock(seqs_mu_);
  std::vector<int64_t> out;
  for (size_t i = 0; i < seqs_.size(); ++i)
    if (seqs_[i]) out.push_back(static_cast<int64_t>(i));
  return out;
}

int64_t cache::seq_add() {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  auto s = std::make_unique<sequence>();
  s->heads.resize(static_cast<size_t>(n_layers_) * n_kv_heads_);
  const int64_t id = static_cast<int64_t>(seqs_.size());
  for (int l = 0; l < n_layers_; ++l)
    for (int h = 0; h < n_kv_heads_; ++h) s->heads[static_cast<size_t>(l) * n_kv_heads_ + h].plan_ = plan_for(l);
  seqs_.push_back(std::move(s));
  return id;
}

namespace {

// Appends the blocks of hs's table to `fp` (full-precision pool) and `sealed` (quantized pool).
void split_blocks(const head_store& hs, std::vector<block_id>& fp, std::vector<block_id>& sealed) {
  for (size_t e = 0; e < hs.table_.size(); ++e)
    if (hs.table_[e] >= 0) (hs.sealed(e) ? sealed : fp).push_back(hs.table_[e]);
}

size_t count_distinct(std::vector<block_id>& v) {
  std::sort(v.begin(), v.end());
  return static_cast<size_t>(std::unique(v.begin(), v.end()) - v.begin());
}

}  // namespace

int64_t cache::seq_fork(int64_t seq) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);  // no operation is in progress on any sequence
  const sequence& src = seq_ref(seq);
  settle_scores(-1);  // the fork copies the scores
  auto s = std::make_unique<sequence>(src);  // copies tables and metadata
  std::vector<block_id> ids, qids;
  for (const auto& hs : s->heads) split_blocks(hs, ids, qids);
  seqs_.push_back(nullptr);  // reserve the id first so a throw below leaks nothing
  pool_->incref_many(ids.data(), ids.size());
  if (!qids.empty()) qpool_->incref_many(qids.data(), qids.size());
  seqs_.back() = std::move(s);
  return static_cast<int64_t>(seqs_.size()) - 1;
}

void cache::release(head_store& hs) {
  std::vector<block_id> ids, qids;
  split_blocks(hs, ids, qids);
  pool_->decref_many(ids.data(), ids.size());
  if (!qids.empty()) qpool_->decref_many(qids.data(), qids.size());
  hs.table_.clear();
  hs.sealed_.clear();
  hs.block_live_.clear();
  hs.live_.clear();
  hs.ord_.clear();
  hs.pos_.clear();
  hs.score_.clear();
  hs.cls_.clear();
  hs.n_live_ = 0;
  hs.hint_ = 0;
  hs.touch_all();
  hs.mirror_.reset();
}

void cache::seq_drop(int64_t seq) {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);
  sequence& s = seq_ref(seq);
  settle_scores(-1);  // (an update must not outlive the stores it writes)
  for (auto& hs : s.heads) release(hs);
  seqs_[seq].reset();
}

int64_t cache::seq_length(int64_t seq) const {
  use_scope scope(*this, {seq}, false, "seq_length");
  return seq_ref(seq).heads[0].n_appended_;
}

const head_store& cache::store(int layer, int head, int64_t seq) const {
  check_layer(layer);
  check_head(head);
  return seq_ref(seq).heads[hidx(layer, head)];
}

head_store& cache::mutable_store(int layer, int head, int64_t seq) {
  return const_cast<head_store&>(store(layer, head, seq));
}

int64_t cache::length(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "length");
  return store(layer, head, seq).length();
}

std::vector<slot_info> cache::live_slots(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "live_slots");
  const head_store& hs = store(layer, head, seq);
  settle_scores(layer);
  std::vector<slot_info> out;
  out.reserve(static_cast<size_t>(hs.length()));
  for (int64_t s = 0; s < hs.n_slots(); ++s)
    if (hs.live(s)) out.push_back({static_cast<int32_t>(s), hs.ord(s), hs.pos(s), hs.token_class(s), hs.score(s)});
  return out;
}

std::vector<block_id> cache::block_table(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "block_table");
  return store(layer, head, seq).table();
}

std::vector<uint8_t> cache::sealed_entries(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "sealed_entries");
  const head_store& hs = store(layer, head, seq);
  std::vector<uint8_t> out(hs.table().size(), 0);
  for (size_t e = 0; e < out.size(); ++e) out[e] = hs.sealed(e) ? 1 : 0;
  return out;
}

std::string cache::plan_name(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "plan_name");
  const head_plan* p = store(layer, head, seq).plan();
  return p ? p->name() : std::string("none");
}

void cache::free_slot(head_store& hs, int64_t slot, std::vector<block_id>* released) {
  const int bs = pool_->block_size();
  const int64_t bi = slot / bs;
  assert(hs.live_[slot]);
  hs.touch(bi);
  hs.live_[slot] = 0;
  hs.ord_[slot] = -1;
  hs.pos_[slot] = 0;
  hs.score_[slot] = 0.f;
  hs.cls_[slot] = 0;
  --hs.n_live_;
  hs.hint_ = std::min(hs.hint_, bi);
  if (--hs.block_live_[bi] == 0) {
    if (hs.sealed(bi)) {
      qpool_->decref(hs.table_[bi]);  // sealed blocks are never the target of a pending copy
      hs.sealed_[bi] = 0;
    } else if (released) {
      released->push_back(hs.table_[bi]);  // the caller gives it back once pending copies ran
    } else {
      pool_->decref(hs.table_[bi]);
    }
    hs.table_[bi] = -1;
    // Trailing holes shrink the table.
    size_t n = hs.table_.size();
    while (n > 0 && hs.table_[n - 1] < 0) --n;
    if (n != hs.table_.size()) {
      hs.table_.resize(n);
      if (!hs.sealed_.empty()) hs.sealed_.resize(n);
      hs.block_live_.resize(n);
      hs.live_.resize(n * bs);
      hs.ord_.resize(n * bs);
      hs.pos_.resize(n * bs);
      hs.score_.resize(n * bs);
      hs.cls_.resize(n * bs);
    }
  }
}

void cache::compact(head_store& hs) {
  const int bs = pool_->block_size();
  // full-precision blocks only: sealed (quantized) rows are never moved (that would re-quantize)
  int64_t held = 0, full = 0, live = hs.n_live_;
  for (size_t e = 0; e < hs.table_.size(); ++e)
    if (hs.table_[e] >= 0) {
      if (hs.sealed(e)) {
        live -= hs.block_live_[e];
      } else {
        ++held;
        full += hs.block_live_[e] == bs;
      }
    }
  const int64_t need = (live + bs - 1) / bs;
  // nothing to gain: no block to free and, in a quantized cache (which seals full blocks), no
  // block to fill (the budget's projection counts the float rows packed)
  if (held <= need && (!qpool_ || full >= live / bs)) return;
  const size_t row = static_cast<size_t>(pool_->head_dim()) * dtype_size(pool_->type());
  // The row moves are collected and run as one batch on the pool's device; blocks emptied by
  // the moves go back to the pool only after that (nothing else may reuse them before).
  std::vector<detail::span_copy> moves;
  std::vector<block_id> released;
  int64_t dst_block = -1;
  bool dst_ok = false;  // dst_block is held exclusively, so it may be written
  int64_t dst = 0, src = hs.n_slots() - 1;
  for (;;) {
    // the lowest free slot in a block we own alone
    for (; dst < hs.n_slots(); ++dst) {
      const int64_t bi = dst / bs;
      if (bi != dst_block) {
        dst_block = bi;
        dst_ok = hs.table_[bi] >= 0 && !hs.sealed(bi) && hs.block_live_[bi] < bs && pool_->refcount(hs.table_[bi]) == 1;
      }
      if (!dst_ok) {
        dst = (bi + 1) * bs - 1;  // skip the block
        continue;
      }
      if (!hs.live_[dst]) break;
    }
    // the highest live slot
    while (src >= 0 && (src >= hs.n_slots() || !hs.live_[src] || hs.sealed(src / bs))) --src;
    if (dst >= src) break;
    char* db = static_cast<char*>(pool_->block_keys(hs.table_[dst / bs]));
    const char* sb = static_cast<const char*>(pool_->block_keys(hs.table_[src / bs]));
    moves.push_back({db + (dst % bs) * row, sb + (src % bs) * row});
    moves.push_back({db + pool_->value_offset() + (dst % bs) * row, sb + pool_->value_offset() + (src % bs) * row});
    hs.touch(dst / bs);
    hs.live_[dst] = 1;
    hs.ord_[dst] = hs.ord_[src];
    hs.pos_[dst] = hs.pos_[src];
    hs.score_[dst] = hs.score_[src];
    hs.cls_[dst] = hs.cls_[src];
    ++hs.block_live_[dst / bs];
    ++hs.n_live_;
    free_slot(hs, src, &released);  // may empty src's block and shrink the table
    --src;
    ++dst;
  }
  if (!moves.empty()) detail::ops_for(pool_->device()).copy_spans(pool_->device_id(), moves, row);
  pool_->decref_many(released.data(), released.size());
}

void cache::seq_rollback(int64_t seq, int64_t n) {
  use_scope scope(*this, {seq}, true, "rollback");
  sequence& s = seq_ref(seq);
  settle_scores(-1);
  if (n < 0) fail_value("rollback: n_tokens must be >= 0, got " + std::to_string(n));
  auto owned = [&](size_t i) { return layer_store_[i / n_kv_heads_] == static_cast<int>(i / n_kv_heads_); };
  for (size_t i = 0; i < s.heads.size(); ++i)
    if (owned(i) && n > s.heads[i].n_appended_)
      fail_value("rollback: cannot roll back " + std::to_string(n) + " tokens, sequence " + std::to_string(seq) +
                 " holds only " + std::to_string(s.heads[i].n_appended_) + " in some head");
  if (n == 0) return;
  for (size_t i = 0; i < s.heads.size(); ++i) {
    if (!owned(i)) continue;  // a CLA reader layer holds nothing
    head_store& hs = s.heads[i];
    const int64_t keep = hs.n_appended_ - n;
    for (int64_t slot = hs.n_slots() - 1; slot >= 0; --slot)
      if (slot < hs.n_slots() && hs.live_[slot] && hs.ord_[slot] >= keep) free_slot(hs, slot);
    hs.n_appended_ = keep;
  }
}

namespace {

append_plan plan_append(const head_store& hs, const block_pool& pool, int64_t n) {
  append_plan p;
  p.slots.reserve(static_cast<size_t>(n));
  const int bs = pool.block_size();
  const int64_t n_entries = static_cast<int64_t>(hs.table().size());
  int64_t remaining = n;
  int64_t bi = hs.hint();
  p.last_entry = bi;
  for (; bi < n_entries && remaining > 0; ++bi) {
    const block_id b = hs.table()[bi];
    if (b >= 0 && hs.sealed(bi)) continue;  // a sealed block takes no new tokens
    if (b < 0) {
      p.hole_entries.push_back(bi);
      for (int o = 0; o < bs && remaining > 0; ++o, --remaining) p.slots.push_back(bi * bs + o);
      p.last_entry = bi;
      continue;
    }
    bool used = false;
    for (int o = 0; o < bs && remaining > 0; ++o) {
      const int64_t slot = bi * bs + o;
      if (!hs.live(slot)) {
        p.slots.push_back(slot);
        --remaining;
        used = true;
      }
    }
    if (used) {
      p.last_entry = bi;
      if (pool.refcount(b) > 1) p.cow_entries.push_back(bi);
    }
  }
  if (remaining > 0) {
    p.new_entries = (remaining + bs - 1) / bs;
    for (int64_t k = 0; k < remaining; ++k) p.slots.push_back(n_entries * bs + k);
    p.last_entry = n_entries + p.new_entries - 1;
  }
  return p;
}

}  // namespace

void cache::append(int layer, int64_t seq, const tensor_view& k, const tensor_view& v, const tensor_view* positions,
                   const tensor_view* classes) {
  use_scope scope(*this, {seq}, true, "append");
  check_layer(layer);
  settle_scores(layer);
  if (layer_store_[layer] != layer)
    fail_value("layer " + std::to_string(layer) + " reads the KV of layer " + std::to_string(layer_store_[layer]) +
               " (cross-layer sharing): append to layer " + std::to_string(layer_store_[layer]));
  sequence& s = seq_ref(seq);
  check_rank(k, 3, "k");
  check_rank(v, 3, "v");
  check_float(k, "k");
  check_float(v, "v");
  check_device(k, pool_->device(), pool_->device_id(), "k");
  check_device(v, pool_->device(), pool_->device_id(), "v");
  const int64_t D = pool_->head_dim();
  if (k.shape[0] != n_kv_heads_ || k.shape[2] != D)
    fail_value("k must be [n_kv_heads=" + std::to_string(n_kv_heads_) + ", n, head_dim=" + std::to_string(D) +
               "], got " + k.describe());
  if (v.shape[0] != k.shape[0] || v.shape[1] != k.shape[1] || v.shape[2] != k.shape[2])
    fail_value("v must have the shape of k " + k.describe() + ", got " + v.describe());
  const int64_t n = k.shape[1];
  const int32_t* pos = nullptr;
  if (positions) {
    check_dtype(*positions, dtype::i32, "positions");
    check_cpu(*positions, "positions");
    if (positions->ndim != 1 || positions->shape[0] != n)
      fail_value("positions must be int32 [" + std::to_string(n) + "], got " + positions->describe());
    if (n > 1 && positions->strides[0] != 1) fail_value("positions must be contiguous");
    pos = static_cast<const int32_t*>(positions->data);
  }
  const uint8_t* cls = nullptr;
  int64_t cls_head_stride = 0;  // per-head classes ([n_kv_heads, n]) or one row for all heads
  if (classes) {
    check_dtype(*classes, dtype::u8, "classes");
    check_cpu(*classes, "classes");
    const bool per_token = classes->ndim == 1 && classes->shape[0] == n && (n <= 1 || classes->strides[0] == 1);
    const bool per_head = classes->ndim == 2 && classes->shape[0] == n_kv_heads_ && classes->shape[1] == n &&
                          (n <= 1 || classes->strides[1] == 1) && classes->strides[0] == n;
    if (!per_token && !per_head)
      fail_value("classes must be contiguous uint8 [" + std::to_string(n) + "] or [n_kv_heads=" +
                 std::to_string(n_kv_heads_) + ", " + std::to_string(n) + "], got " + classes->describe());
    cls = static_cast<const uint8_t*>(classes->data);
    cls_head_stride = per_head ? n : 0;
  }
  if (n == 0) return;
  const size_t base = hidx(layer, 0);
  if (s.heads[base].n_appended_ + n > INT32_MAX) fail_value("append: sequence would exceed 2^31 tokens");
  if (qpool_) check_quantizable(k, v);

  // 1. Plan every head and reserve all blocks at once (all or nothing).
  std::vector<append_plan> plans(static_cast<size_t>(n_kv_heads_));
  int64_t need = 0;
  for (int h = 0; h < n_kv_heads_; ++h) {
    plans[h] = plan_append(s.heads[base + h], *pool_, n);
    need += plans[h].blocks_needed();
  }
  std::vector<block_id> fresh(static_cast<size_t>(need));
  pool_->alloc(need, fresh.data());  // throws capacity_error with nothing changed

  // 2. Execute: nothing below can fail. Copy-on-write copies and row writes are collected
  // and run as two batches on the pool's device (copies first: rows may land in copied blocks).
  const int bs = pool_->block_size();
  const size_t row_bytes = static_cast<size_t>(D) * dtype_size(pool_->type());
  std::vector<block_id> released;
  std::vector<detail::span_copy> cow;
  std::vector<detail::row_write> rows;
  rows.reserve(static_cast<size_t>(n * n_kv_heads_));
  size_t next = 0;
  for (int h = 0; h < n_kv_heads_; ++h) {
    head_store& hs = s.heads[base + h];
    const append_plan& p = plans[h];
    for (int64_t bi : p.cow_entries) {
      const block_id nb = fresh[next++];
      cow.push_back({pool_->block_keys(nb), pool_->block_keys(hs.table_[bi])});
      released.push_back(hs.table_[bi]);
      hs.table_[bi] = nb;
      hs.touch(bi);
    }
    for (int64_t bi : p.hole_entries) {
      hs.table_[bi] = fresh[next++];
      hs.touch(bi);
    }
    if (p.new_entries > 0) {
      const size_t old = hs.table_.size();
      const size_t total = old + static_cast<size_t>(p.new_entries);
      for (int64_t i = 0; i < p.new_entries; ++i) hs.table_.push_back(fresh[next++]);
      hs.block_live_.resize(total, 0);
      if (qpool_) hs.sealed_.resize(total, 0);
      hs.live_.resize(total * bs, 0);
      hs.ord_.resize(total * bs, -1);
      hs.pos_.resize(total * bs, 0);
      hs.score_.resize(total * bs, 0.f);
      hs.cls_.resize(total * bs, 0);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = p.slots[j];
      const int64_t bi = slot / bs, off = slot % bs;
      char* kb = static_cast<char*>(pool_->block_keys(hs.table_[bi]));
      rows.push_back({kb + off * row_bytes, kb + pool_->value_offset() + off * row_bytes, h, static_cast<int32_t>(j)});
      hs.touch(bi);
      const int32_t ord = static_cast<int32_t>(hs.n_appended_ + j);
      hs.live_[slot] = 1;
      hs.ord_[slot] = ord;
      hs.pos_[slot] = pos ? pos[j] : ord;
      hs.score_[slot] = 0.f;
      hs.cls_[slot] = cls ? cls[h * cls_head_stride + j] : 0;
      ++hs.block_live_[bi];
    }
    hs.n_live_ += n;
    hs.n_appended_ += n;
    hs.hint_ = p.last_entry;
  }
  assert(next == fresh.size());
  const detail::device_ops& ops = detail::ops_for(pool_->device());
  if (!cow.empty()) ops.copy_spans(pool_->device_id(), cow, pool_->block_bytes());
  ops.write_rows(pool_->device_id(), k, v, rows, pool_->type(), D);
  pool_->decref_many(released.data(), released.size());
  if (qpool_) {  // blocks this append did not write are final for now: quantize the full ones
    std::vector<uint8_t> touched;
    for (int h = 0; h < n_kv_heads_; ++h) {
      head_store& hs = s.heads[base + h];
      touched.assign(hs.table_.size(), 0);
      for (int64_t slot : plans[h].slots) touched[static_cast<size_t>(slot / bs)] = 1;
      seal_full(hs, &touched);
    }
  }
}

void cache::seal_full(head_store& hs, const std::vector<uint8_t>* skip) {
  if (!qpool_) return;
  const int bs = pool_->block_size();
  const int64_t D = pool_->head_dim();
  const dtype t = pool_->type();
  hs.sealed_.resize(hs.table_.size(), 0);
  const quant_layout& L = *qpool_->quant();
  auto sealable = [&](size_t bi) { return hs.table_[bi] >= 0 && !hs.sealed_[bi] && hs.block_live_[bi] == bs; };
  // 2 bits (kvloom/quant.h): the first block and the full block holding the newest token stay
  int64_t keep = L.keep_first ? 0 : -1, newest = -1, newest_ord = -1;
  if (L.keep_newest)
    for (size_t bi = 0; bi < hs.table_.size(); ++bi)
      if (sealable(bi))
        for (int64_t sl = static_cast<int64_t>(bi) * bs; sl < static_cast<int64_t>(bi + 1) * bs; ++sl)
          if (hs.ord(sl) > newest_ord) {
            newest_ord = hs.ord(sl);
            newest = static_cast<int64_t>(bi);
          }
  std::vector<size_t> todo;  // the entries to seal, each with a quantized block
  std::vector<block_id> qbs;
  for (size_t bi = 0; bi < hs.table_.size(); ++bi) {
    if (!sealable(bi) || (skip && (*skip)[bi]) || static_cast<int64_t>(bi) == keep || static_cast<int64_t>(bi) == newest)
      continue;
    block_id qb;
    try {
      qpool_->alloc(1, &qb);
    } catch (const capacity_error&) {
      break;  // the quantized pool is full: the other blocks stay in full precision
    }
    todo.push_back(bi);
    qbs.push_back(qb);
  }
  if (todo.empty()) return;
  // Their rows as fp32 on the host in one batched read (a device pool: one copy, one wait),
  // quantized there by the one quantizer (quant.cpp) and, for a device pool, uploaded.
  const size_t per = static_cast<size_t>(2 * bs * D);  // floats per block: keys, then values
  const size_t row = static_cast<size_t>(D) * dtype_size(pool_->type());
  const bool on_host = pool_->device() == device_kind::cpu;
  const detail::device_ops& ops = detail::ops_for(pool_->device());
  size_t done = 0;
  try {
    std::vector<const void*> rows;
    rows.reserve(todo.size() * 2 * static_cast<size_t>(bs));
    for (size_t bi : todo) {
      const char* kb = static_cast<const char*>(pool_->block_keys(hs.table_[bi]));
      for (int part = 0; part < 2; ++part)
        for (int r = 0; r < bs; ++r) rows.push_back(kb + part * pool_->value_offset() + r * row);
    }
    std::vector<float> kv(todo.size() * per);
    ops.rows_to_host_f32(pool_->device_id(), rows, t, D, kv.data());
    std::vector<char> staged(on_host ? 0 : qpool_->block_bytes());
    for (; done < todo.size(); ++done) {
      const size_t bi = todo[done];
      const block_id qb = qbs[done];
      const float* kf = kv.data() + done * per;
      try {
        quantize_block(L, kf, kf + bs * D, bs, nullptr, on_host ? qpool_->block_keys(qb) : staged.data());
      } catch (const std::invalid_argument&) {  // out of fp16's range after rounding to the storage dtype
        qpool_->decref(qb);
        continue;
      }
      if (!on_host) detail::block_from_host(*qpool_, qb, staged.data());
      pool_->decref(hs.table_[bi]);
      hs.table_[bi] = qb;
      hs.sealed_[bi] = 1;
      hs.touch(static_cast<int64_t>(bi));
    }
  } catch (...) {  // a device error: the blocks not sealed yet stay in full precision
    for (; done < todo.size(); ++done) qpool_->decref(qbs[done]);
    throw;
  }
}

void cache::check_quantizable(const tensor_view& k_in, const tensor_view& v_in) const {
  // device tensors are checked from a host copy (one wait each)
  const detail::host_tensor kh = detail::tensor_on_host(k_in), vh = detail::tensor_on_host(v_in);
  const tensor_view& k = kh.view;
  for (const tensor_view* t : {&kh.view, &vh.view}) {
    const int64_t H = t->shape[0], n = t->shape[1], D = t->shape[2];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const float x = load_as_f32(t->data, t->type,
                                      static_cast<size_t>(h * t->strides[0] + j * t->strides[1] + d * t->strides[2]));
          if (!(std::fabs(x) <= 65504.f))
            fail_value(std::string("a quantized cache takes finite keys and values within fp16's range (|x| <= 65504); ") +
                       (t == &k ? "k" : "v") + " has " + std::to_string(x) + " at [" + std::to_string(h) + ", " +
                       std::to_string(j) + ", " + std::to_string(d) + "]");
        }
  }
}

void cache::evict(int layer, int head, int64_t seq, const int32_t* slots, int64_t n) {
  use_scope scope(*this, {seq}, true, "evict");
  check_layer(layer);
  settle_scores(layer);
  evict_unlocked(layer, head, seq, slots, n);
}

void cache::evict_unlocked(int layer, int head, int64_t seq, const int32_t* slots, int64_t n) {
  head_store& hs = mutable_store(layer, head, seq);
  if (n < 0) fail_value("evict: negative count");
  std::vector<int32_t> sorted(slots, slots + n);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t sl = sorted[i];
    if (sl < 0 || sl >= hs.n_slots() || !hs.live_[sl])
      fail_index("evict: slot " + std::to_string(sl) + " is not a live slot of layer " + std::to_string(layer) +
                 " head " + std::to_string(head) + " sequence " + std::to_string(seq));
    if (i > 0 && sorted[i - 1] == sl) fail_value("evict: slot " + std::to_string(sl) + " named twice");
  }
  // Free from the highest slot down so table shrinking never invalidates a pending slot.
  for (int64_t i = n - 1; i >= 0; --i) free_slot(hs, sorted[i]);
}

int64_t cache::apply_policy(int layer, int64_t seq, int64_t full_tokens) {
  use_scope scope(*this, {seq}, true, "apply_policy");
  check_layer(layer);
  settle_scores(layer);
  if (full_tokens < -1) fail_value("apply_policy: full_tokens must be >= 0 (or -1: the tokens appended), got " +
                                   std::to_string(full_tokens));
  sequence& s = seq_ref(seq);
  if (layer_store_[layer] != layer) return 0;  // the owner layer's policy runs on the shared store
  int64_t total = 0;
  std::vector<int32_t> victims;
  for (int h = 0; h < n_kv_heads_; ++h) {
    const head_store& hs = s.heads[hidx(layer, h)];
    victims.clear();
    if (hs.plan_) hs.plan_->select_evictions(hs, victims);
    if (!victims.empty()) evict_unlocked(layer, h, seq, victims.data(), static_cast<int64_t>(victims.size()));
    // also when nothing was evicted now: blocks shared with a since-dropped fork may have
    // become exclusive, hence compactable
    compact(s.heads[hidx(layer, h)]);
    seal_full(s.heads[hidx(layer, h)]);
    total += static_cast<int64_t>(victims.size());
  }
  if (budget_.load() > 0.0) total += enforce_budget(layer, s, seq, full_tokens);
  return total;
}

void cache::set_budget(double fraction) {
  if (!(fraction >= 0.0 && fraction <= 1e6)) fail_value("budget must be a fraction > 0 (or 0: none), got " + std::to_string(fraction));
  budget_.store(fraction);
}

size_t cache::budget_bytes(int64_t full_tokens) const {
  const int64_t bs = pool_->block_size();
  const double full = static_cast<double>(static_cast<size_t>(n_kv_heads_) * static_cast<size_t>((full_tokens + bs - 1) / bs) *
                                          pool_->block_bytes());
  const double want = std::floor(budget_.load() * full);
  const size_t floor_bytes = static_cast<size_t>(n_kv_heads_) * (pool_->block_bytes() + (qpool_ ? qpool_->block_bytes() : 0));
  return std::max(floor_bytes, static_cast<size_t>(want));
}

size_t cache::head_bytes(const head_store& hs) const {
  size_t fp = 0, q = 0;
  for (size_t e = 0; e < hs.table_.size(); ++e)
    if (hs.table_[e] >= 0) ++(hs.sealed(e) ? q : fp);
  return fp * pool_->block_bytes() + (q ? q * qpool_->block_bytes() : 0);
}

namespace {

bool gives_way_before(const cache::budget_unit& a, const cache::budget_unit& b) {
  if (a.key.tier != b.key.tier) return a.key.tier < b.key.tier;
  if (a.key.value != b.key.value) return a.key.value < b.key.value;
  if (a.ord != b.ord) return a.ord < b.ord;
  if (a.head != b.head) return a.head < b.head;
  return a.index < b.index;
}

give_way_key key_of(const head_store& hs, int64_t slot) {
  if (hs.ord(slot) == hs.appended() - 1) return {kNeverGivesWay, 0.0};
  if (!hs.plan()) return {0, static_cast<double>(hs.ord(slot))};
  give_way_key k = hs.plan()->give_way(hs, slot);
  if (k.tier == kNeverGivesWay) k.tier = kNeverGivesWay - 1;  // only the cache protects
  return k;
}

}  // namespace

std::vector<give_way_key> cache::give_way_keys(int layer, int head, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "give_way_keys");
  const head_store& hs = store(layer, head, seq);
  settle_scores(layer);
  std::vector<give_way_key> out;
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live(sl)) out.push_back(key_of(hs, sl));
  return out;
}

size_t cache::layer_bytes_unlocked(int layer, const sequence& s) const {
  size_t held = 0;
  for (int h = 0; h < n_kv_heads_; ++h) held += head_bytes(s.heads[hidx(layer, h)]);
  return held;
}

size_t cache::layer_bytes(int layer, int64_t seq) const {
  use_scope scope(*this, {seq}, false, "layer_bytes");
  check_layer(layer);
  return layer_bytes_unlocked(layer, seq_ref(seq));
}

std::vector<cache::budget_unit> cache::budget_units_unlocked(int layer, const sequence& s, size_t* projected) const {
  const int bs = pool_->block_size();
  const size_t fbb = pool_->block_bytes(), qbb = qpool_ ? qpool_->block_bytes() : 0;
  // bytes a head will hold with `fp` live float tokens once compacted (and sealed)
  auto float_bytes = [&](int64_t fp) -> size_t {
    if (!qpool_) return static_cast<size_t>((fp + bs - 1) / bs) * fbb;
    const quant_layout& L = *qpool_->quant();  // 2 bits keep the first block and the newest full one
    size_t out = 0;
    if (L.keep_first && fp > 0) {
      out += fbb;
      fp = std::max<int64_t>(0, fp - bs);
    }
    int64_t full = fp / bs;
    if (L.keep_newest && full > 0) {
      out += fbb;
      --full;
    }
    return out + static_cast<size_t>(full) * qbb + (fp % bs ? fbb : 0);
  };
  std::vector<budget_unit> units;
  std::vector<int64_t> fp_live(static_cast<size_t>(n_kv_heads_), 0);
  size_t total = 0;
  for (int h = 0; h < n_kv_heads_; ++h) {
    const head_store& hs = s.heads[hidx(layer, h)];
    size_t sealed_held = 0;
    for (size_t e = 0; e < hs.table_.size(); ++e) {
      if (hs.table_[e] < 0) continue;
      const int64_t first = static_cast<int64_t>(e) * bs;
      if (!hs.sealed(e)) {
        for (int64_t sl = first; sl < first + bs; ++sl) {
          if (!hs.live(sl)) continue;
          ++fp_live[h];
          const give_way_key k = key_of(hs, sl);
          if (k.tier != kNeverGivesWay) units.push_back({k, hs.ord(sl), h, sl, false, 0});
        }
        continue;
      }
      ++sealed_held;
      budget_unit u{{0, 0.0}, 0, h, static_cast<int64_t>(e), true, qbb};
      bool any = false;
      for (int64_t sl = first; sl < first + bs; ++sl) {
        if (!hs.live(sl)) continue;
        const budget_unit one{key_of(hs, sl), hs.ord(sl), h, static_cast<int64_t>(e), true, qbb};
        if (!any || gives_way_before(u, one)) u = one;  // the block's key: its last to give way
        any = true;
      }
      if (any && u.key.tier != kNeverGivesWay) units.push_back(u);
    }
    total += sealed_held * qbb + float_bytes(fp_live[h]);
  }
  std::sort(units.begin(), units.end(), gives_way_before);
  for (budget_unit& u : units) {  // in give-way order, each float token packs its head tighter
    if (u.block) continue;
    const int64_t fp = fp_live[static_cast<size_t>(u.head)]--;
    u.frees = float_bytes(fp) - float_bytes(fp - 1);
  }
  if (projected) *projected = total;
  return units;
}

std::vector<cache::budget_unit> cache::budget_units(int layer, int64_t seq, size_t* projected) const {
  use_scope scope(*this, {seq}, false, "budget_units");
  check_layer(layer);
  settle_scores(layer);
  return budget_units_unlocked(layer_store_[layer], seq_ref(seq), projected);
}

int64_t cache::give_way_unlocked(int layer, sequence& s, int64_t seq, const std::vector<budget_unit>& units) {
  const int bs = pool_->block_size();
  std::vector<std::vector<int32_t>> victims(static_cast<size_t>(n_kv_heads_));
  for (const budget_unit& u : units) {
    if (u.head < 0 || u.head >= n_kv_heads_) fail_index("give_way: head " + std::to_string(u.head) + " out of range");
    const head_store& hs = s.heads[hidx(layer, u.head)];
    auto& out = victims[static_cast<size_t>(u.head)];
    if (u.block) {
      if (u.index < 0 || u.index >= static_cast<int64_t>(hs.table_.size()) || hs.table_[u.index] < 0 ||
          !hs.sealed(static_cast<size_t>(u.index)))
        fail_index("give_way: table entry " + std::to_string(u.index) + " of head " + std::to_string(u.head) +
                   " holds no sealed block");
      for (int64_t sl = u.index * bs; sl < (u.index + 1) * bs; ++sl)
        if (hs.live(sl)) out.push_back(static_cast<int32_t>(sl));
    } else {
      out.push_back(static_cast<int32_t>(u.index));
    }
  }
  // check every head's victims before changing any head: all or nothing
  for (int h = 0; h < n_kv_heads_; ++h) {
    auto& v = victims[static_cast<size_t>(h)];
    std::sort(v.begin(), v.end());
    const head_store& hs = s.heads[hidx(layer, h)];
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] < 0 || v[i] >= hs.n_slots() || !hs.live(v[i]) || (i > 0 && v[i - 1] == v[i]))
        fail_index("give_way: slot " + std::to_string(v[i]) + " of head " + std::to_string(h) +
                   " is not a live slot named once");
  }
  int64_t total = 0;
  for (int h = 0; h < n_kv_heads_; ++h) {
    auto& v = victims[static_cast<size_t>(h)];
    if (v.empty()) continue;
    evict_unlocked(layer, h, seq, v.data(), static_cast<int64_t>(v.size()));
    compact(s.heads[hidx(layer, h)]);
    seal_full(s.heads[hidx(layer, h)]);
    total += static_cast<int64_t>(v.size());
  }
  return total;
}

int64_t cache::give_way(int layer, int64_t seq, const std::vector<budget_unit>& units) {
  use_scope scope(*this, {seq}, true, "give_way");
  check_layer(layer);
  settle_scores(layer);
  return give_way_unlocked(layer_store_[layer], seq_ref(seq), seq, units);
}

int64_t cache::enforce_budget(int layer, sequence& s, int64_t seq, int64_t full_tokens) {
  if (full_tokens < 0) full_tokens = s.heads[hidx(layer, 0)].appended();
  const size_t limit = budget_bytes(full_tokens);
  int64_t total = 0;
  // Rounds on the real state: where forks share blocks, compaction can fall short of the
  // projection; every round takes at least one unit, so the loop ends.
  while (layer_bytes_unlocked(layer, s) > limit) {
    size_t projected = 0;
    std::vector<budget_unit> units = budget_units_unlocked(layer, s, &projected);
    if (units.empty()) break;  // only protected tokens are left
    size_t n = 0;
    while (n < units.size() && (n == 0 || projected > limit)) projected -= units[n++].frees;
    units.resize(n);
    total += give_way_unlocked(layer, s, seq, units);
  }
  return total;
}

void cache::set_head_plan(int layer, int head, int64_t seq, std::shared_ptr<const head_plan> plan) {
  use_scope scope(*this, {seq}, true, "set_head_plan");
  head_store& hs = mutable_store(layer, head, seq);
  if (!plan) fail_value("set_head_plan: plan must not be null");
  hs.plan_ = std::move(plan);
}

void cache::gather(int layer, int head, int64_t seq, const tensor_view& k_out, const tensor_view& v_out,
                   const tensor_view* ord_out, const tensor_view* pos_out) const {
  use_scope scope(*this, {seq}, false, "gather");
  const head_store& hs = store(layer, head, seq);
  const int64_t L = hs.length(), D = pool_->head_dim();
  for (const tensor_view* t : {&k_out, &v_out}) {
    check_rank(*t, 2, "gather output");
    check_float(*t, "gather output");
    check_device(*t, pool_->device(), pool_->device_id(), "gather output");
    if (t->shape[0] != L || t->shape[1] != D)
      fail_value("gather output must be [" + std::to_string(L) + ", " + std::to_string(D) + "], got " + t->describe());
  }
  for (const tensor_view* t : {ord_out, pos_out}) {
    if (!t) continue;
    check_dtype(*t, dtype::i32, "gather ord/pos output");
    check_cpu(*t, "gather ord/pos output");
    if (t->ndim != 1 || t->shape[0] != L) fail_value("gather ord/pos output must be int32 [" + std::to_string(L) + "]");
  }
  std::vector<int64_t> slots;
  slots.reserve(static_cast<size_t>(L));
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live_[sl]) slots.push_back(sl);
  std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return hs.ord_[a] < hs.ord_[b]; });
  const int bs = pool_->block_size();
  const size_t row = static_cast<size_t>(D) * dtype_size(pool_->type());
  std::vector<detail::row_read> rows(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    const int64_t sl = slots[i];
    const char* kb = static_cast<const char*>(pool_of(hs, static_cast<size_t>(sl / bs)).block_keys(hs.table_[sl / bs]));
    rows[i] = {kb + (sl % bs) * row, kb + pool_->value_offset() + (sl % bs) * row};
    if (ord_out) static_cast<int32_t*>(ord_out->data)[i * ord_out->strides[0]] = hs.ord_[sl];
    if (pos_out) static_cast<int32_t*>(pos_out->data)[i * pos_out->strides[0]] = hs.pos_[sl];
  }
  if (L == 0) return;
  const detail::device_ops& ops = detail::ops_for(pool_->device());
  if (!qpool_) return ops.read_rows(pool_->device_id(), rows, pool_->type(), D, k_out, v_out);
  // a quantized cache: every row as fp32 on the host first, then written out as the rows of
  // an fp32 gather
  std::vector<float> kv(static_cast<size_t>(2 * L * D));
  detail::store_rows_f32(hs, *pool_, qpool_.get(), slots, kv.data(), kv.data() + L * D);
  if (pool_->device() == device_kind::cpu) {
    for (int64_t i = 0; i < L; ++i) rows[i] = {kv.data() + i * D, kv.data() + (L + i) * D};
    return ops.read_rows(0, rows, dtype::f32, D, k_out, v_out);
  }
  // device outputs: the fp32 rows go up once and are read from there
  const size_t bytes = kv.size() * sizeof(float);
  void* dev = ops.arena_alloc(pool_->device_id(), bytes);
  if (!dev) throw capacity_error("gather: device memory exhausted for the dequantized rows");
  try {
    ops.from_host(pool_->device_id(), dev, kv.data(), bytes);
    const float* dk = static_cast<const float*>(dev);
    for (int64_t i = 0; i < L; ++i) rows[i] = {dk + i * D, dk + (L + i) * D};
    ops.read_rows(pool_->device_id(), rows, dtype::f32, D, k_out, v_out);
  } catch (...) {
    ops.arena_free(pool_->device_id(), dev);
    throw;
  }
  ops.arena_free(pool_->device_id(), dev);
}

namespace detail {

void store_rows_f32(const head_store& hs, const block_pool& pool, const block_pool* qpool,
                    const std::vector<int64_t>& slots, float* k_out, float* v_out) {
  const int bs = pool.block_size();
  const int64_t D = pool.head_dim();
  const size_t row = static_cast<size_t>(D) * dtype_size(pool.type());
  const int parts = v_out ? 2 : 1;
  std::vector<std::pair<int64_t, size_t>> sealed;  // (table entry, index in slots)
  std::vector<size_t> fp_at;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (qpool && hs.sealed(static_cast<size_t>(slots[i] / bs))) sealed.push_back({slots[i] / bs, i});
    else fp_at.push_back(i);
  }
  if (!fp_at.empty()) {  // keys of the full-precision rows, then their values: one read
    std::vector<const void*> src;
    src.reserve(parts * fp_at.size());
    for (int part = 0; part < parts; ++part)
      for (size_t i : fp_at) {
        const char* kb = static_cast<const char*>(pool.block_keys(hs.table()[slots[i] / bs]));
        src.push_back(kb + part * pool.value_offset() + static_cast<size_t>(slots[i] % bs) * row);
      }
    const detail::device_ops& ops = detail::ops_for(pool.device());
    if (fp_at.size() == slots.size() && parts == 1) {
      ops.rows_to_host_f32(pool.device_id(), src, pool.type(), D, k_out);  // (no rows to interleave)
    } else {
      std::vector<float> fp(src.size() * static_cast<size_t>(D));
      ops.rows_to_host_f32(pool.device_id(), src, pool.type(), D, fp.data());
      for (int part = 0; part < parts; ++part)
        for (size_t j = 0; j < fp_at.size(); ++j)
          std::copy_n(fp.data() + (part * fp_at.size() + j) * D, D, (part ? v_out : k_out) + fp_at[j] * D);
    }
  }
  if (sealed.empty()) return;
  std::sort(sealed.begin(), sealed.end());  // each sealed block read and dequantized once
  std::vector<float> tile(static_cast<size_t>(2 * bs * D));
  std::vector<char> qbuf;
  int64_t cur = -1;
  for (const auto& [e, i] : sealed) {
    if (e != cur) {
      cur = e;
      dequantize_block(*qpool->quant(), block_on_host(*qpool, hs.table()[e], qbuf), bs, tile.data(), tile.data() + bs * D);
    }
    const int64_t r = slots[i] % bs;
    std::copy_n(tile.data() + r * D, D, k_out + i * D);
    if (v_out) std::copy_n(tile.data() + (bs + r) * D, D, v_out + i * D);
  }
}

}  // namespace detail

std::pair<size_t, size_t> cache::blocks_held_unlocked() const {
  std::vector<block_id> ids, qids;
  for (const auto& s : seqs_)
    if (s)
      for (const auto& hs : s->heads) split_blocks(hs, ids, qids);
  return {count_distinct(ids), count_distinct(qids)};
}

int64_t cache::blocks_held() const {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);  // waits for the operations in progress
  const auto held = blocks_held_unlocked();
  return static_cast<int64_t>(held.first + held.second);
}

size_t cache::memory_bytes() const {
  std::unique_lock<std::shared_mutex> lock(seqs_mu_);  // waits for the operations in progress
  const auto held = blocks_held_unlocked();
  return held.first * pool_->block_bytes() + (held.second ? held.second * qpool_->block_bytes() : 0);
}

}  // namespace kvloom
