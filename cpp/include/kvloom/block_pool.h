// kvloom/block_pool.h — fixed-size blocks of KV memory with reference counts.
//
// A block holds `block_size` tokens of ONE kv head: keys [block_size, head_dim] followed
// by values [block_size, head_dim], in the pool's dtype. Blocks are handed out by id; the
// memory behind an id never moves (the pool grows by whole arena chunks and never
// reallocates a chunk), so a pointer obtained from block_keys() stays valid while the
// caller holds a reference to the block.
//
// A quantized pool (quant_bits 8, 4 or 2) holds blocks in kvloom's quantized format instead
// (kvloom/quant.h: codes and scales of keys and values in one run of bytes at block_keys();
// type() is uint8 and block_values() is meaningless), on the host or a CUDA device.
//
// A pool lives on one device: the host (default) or a CUDA device, whose blocks are device
// memory that the host never dereferences (kvloom/device.h).
//
// Capacity is a hard limit in blocks, set at construction. Allocation is all-or-nothing:
// alloc() either returns every block asked for or throws capacity_error having changed
// nothing, which is what lets caches stay intact when the pool runs out.
//
// Thread safety: every public member may be called concurrently from any thread. The free
// list, the reference counts and the arena growth are protected by one internal mutex;
// block memory itself is not synchronised (writers own the blocks they write, see cache.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kvloom/common.h"
#include "kvloom/quant.h"
#include "kvloom/tensor_view.h"

namespace kvloom {

using block_id = int32_t;

class block_pool {
 public:
  // block_size tokens per block, head_dim features per token; capacity_blocks is the hard
  // limit; chunk_blocks how many blocks each arena chunk adds (0: a sensible default);
  // device/device_id where the blocks live (std::invalid_argument when that device is not built in).
  block_pool(dtype type, int head_dim, int block_size, int64_t capacity_blocks, int64_t chunk_blocks = 0,
             device_kind device = device_kind::cpu, int device_id = 0, int quant_bits = 0);
  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;
  ~block_pool();

  dtype type() const { return type_; }
  int head_dim() const { return head_dim_; }
  int block_size() const { return block_size_; }
  size_t block_bytes() const { return block_bytes_; }  // keys + values of one block
  int64_t capacity_blocks() const { return capacity_; }
  device_kind device() const { return device_; }
  int device_id() const { return device_id_; }
  // The block layout of a quantized pool, null for a float one.
  const quant_layout* quant() const { return quant_bits_ ? &quant_ : nullptr; }

  // Allocates n blocks with reference count 1 into out[0..n). All or nothing: throws
  // capacity_error (nothing allocated) when fewer than n blocks are left.
  void alloc(int64_t n, block_id* out);
  void incref(block_id id);
  void incref_many(const block_id* ids, size_t n);
  // Drops one reference; a block whose count reaches 0 returns to the free list.
  void decref(block_id id);
  void decref_many(const block_id* ids, size_t n);
  int32_t refcount(block_id id) const;

  // Base of the block's keys [block_size, head_dim]; values follow at value_offset bytes.
  // (A device address for a CUDA pool.)
  void* block_keys(block_id id) const;
  void* block_values(block_id id) const { return static_cast<char*>(block_keys(id)) + value_offset_; }
  size_t value_offset() const { return value_offset_; }

  int64_t used_blocks() const;      // blocks with refcount > 0
  int64_t free_blocks() const;      // capacity - used
  size_t reserved_bytes() const;    // arena bytes obtained from the system so far

 private:
  void grow_locked(int64_t need_total);
  void check_id(block_id id) const;

  const dtype type_;
  const int head_dim_;
  const int block_size_;
  const int64_t capacity_;
  const device_kind device_;
  const int device_id_;
  const int quant_bits_;
  quant_layout quant_;
  int64_t chunk_blocks_;
  size_t value_offset_;
  size_t block_bytes_;

  mutable std::mutex mu_;
  // chunk i holds blocks [i*chunk_blocks, (i+1)*chunk_blocks); the pointer array is sized
  // once at construction so readers never see it move.
  std::unique_ptr<char*[]> chunks_;     // [n_chunk_slots]
  int64_t n_chunk_slots_ = 0;
  int64_t n_chunks_ = 0;                // chunks allocated so far
  std::vector<int32_t> refcount_;       // [n_chunks * chunk_blocks]
  std::vector<block_id> free_list_;     // ids with refcount 0 inside allocated chunks
  int64_t used_ = 0;
};

}  // namespace kvloom
