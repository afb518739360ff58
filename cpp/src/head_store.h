// Internal: the KV of one (layer, kv head, sequence) — a block table plus per-slot metadata.
//
// A block table maps slot s to block table[s / block_size], offset s % block_size. Every
// slot carries: live flag, `ord` (0-based index of the token in the order it was appended
// to this sequence: the logical token index), `pos` (its RoPE position), a class byte
// (token-class bits or a NAtS type) and a score (accumulated attention). Attention is
// permutation-invariant over keys, so eviction just frees a slot; a new token fills the
// lowest free slot; a block whose slots are all free goes back to the pool.
//
// In a quantized cache a table entry is either an open block of the float pool (new tokens
// land only there) or a sealed block of the cache's quantized pool (sealed_[i] = 1): a float
// block is quantized once, when all its slots are live, and a sealed block is never written
// again; its tokens can still be evicted (their slots die) and it goes back to the pool with
// its last token.
//
// The cache (cache.cpp, scores.cpp) maintains the invariants; kernels and plans only read.
//
// Every change to the table, the sealed flags or a slot's live flag or ord marks its table
// entry with touch(entry) (release: touch_all): on a CUDA cache that is what the device mirror
// of the store uploads before the next kernel reads it (device_mirror.h). A missed touch is a
// stale device table; the simulated CUDA build checks every mirror after each upload.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "device_mirror.h"
#include "kvloom/block_pool.h"

namespace kvloom {

class head_plan;

struct head_store {
  int64_t length() const { return n_live_; }        // live tokens
  int64_t appended() const { return n_appended_; }  // tokens ever appended (logical length)
  int64_t n_slots() const { return static_cast<int64_t>(live_.size()); }
  const std::vector<block_id>& table() const { return table_; }
  bool sealed(int64_t entry) const { return !sealed_.empty() && sealed_[entry] != 0; }
  bool live(int64_t slot) const { return live_[slot] != 0; }
  int32_t ord(int64_t slot) const { return ord_[slot]; }
  int32_t pos(int64_t slot) const { return pos_[slot]; }
  float score(int64_t slot) const { return score_[slot]; }
  uint8_t token_class(int64_t slot) const { return cls_[slot]; }
  const uint8_t* live_data() const { return live_.data(); }
  const std::vector<uint16_t>& block_live() const { return block_live_; }
  int64_t hint() const { return hint_; }
  const head_plan* plan() const { return plan_.get(); }
  // Marks table entry `entry` changed: it joins the dirty range it touches or borders, else
  // starts a range of its own, else (all kDirtyRanges in use) widens the nearest one. A decode
  // step of an evicting policy changes an entry or two far from the table's tail, where the
  // new token lands: separate ranges keep its upload to those entries, not the span between.
  void touch(int64_t entry) const {
    int nearest = 0;
    int64_t nearest_gap = std::numeric_limits<int64_t>::max();
    for (int i = 0; i < n_dirty_; ++i) {
      entry_range& r = dirty_[i];
      const int64_t gap = entry < r.lo ? r.lo - 1 - entry : entry >= r.hi ? entry - r.hi : 0;
      if (gap == 0) {
        r.lo = std::min(r.lo, entry);
        r.hi = std::max(r.hi, entry + 1);
        return;
      }
      if (gap < nearest_gap) {
        nearest_gap = gap;
        nearest = i;
      }
    }
    if (n_dirty_ < kDirtyRanges) {
      dirty_[n_dirty_++] = {entry, entry + 1};
      return;
    }
    entry_range& r = dirty_[nearest];
    r.lo = std::min(r.lo, entry);
    r.hi = std::max(r.hi, entry + 1);
  }
  void touch_all() const {
    n_dirty_ = 1;
    dirty_[0] = {0, std::numeric_limits<int64_t>::max()};
  }

  std::vector<block_id> table_;          // [n_blocks], -1 = no block
  std::vector<uint8_t> sealed_;          // [n_blocks] in a quantized cache (else empty): 1 = quantized pool
  std::vector<uint16_t> block_live_;     // [n_blocks] live slots per block
  std::vector<uint8_t> live_;            // [n_blocks * block_size]
  std::vector<int32_t> ord_;             // [n_blocks * block_size]
  std::vector<int32_t> pos_;             // [n_blocks * block_size]
  std::vector<float> score_;             // [n_blocks * block_size] attention received so far
  std::vector<uint8_t> cls_;             // [n_blocks * block_size] class byte
  int64_t n_live_ = 0;
  int64_t n_appended_ = 0;
  int64_t hint_ = 0;  // no block before this table index has a free slot
  std::shared_ptr<const head_plan> plan_;
  // Table entries changed since the device mirror's last upload: dirty_[0, n_dirty_), half-open
  // ranges that may overlap (none: clean). The backend reads and clears them with the mirror,
  // under its own lock (a decode on a const cache updates them; writers of the store hold it
  // exclusively).
  struct entry_range {
    int64_t lo, hi;
  };
  static constexpr int kDirtyRanges = 4;
  mutable entry_range dirty_[kDirtyRanges] = {{0, std::numeric_limits<int64_t>::max()}};
  mutable int n_dirty_ = 1;
  mutable detail::mirror_handle mirror_;
};

}  // namespace kvloom
