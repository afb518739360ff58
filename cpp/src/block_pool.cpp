#include "kvloom/block_pool.h"

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <string>

#include "device.h"

namespace kvloom {

namespace {
constexpr size_t kAlign = 64;
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
}  // namespace

block_pool::block_pool(dtype type, int head_dim, int block_size, int64_t capacity_blocks, int64_t chunk_blocks,
                       device_kind device, int device_id, int quant_bits)
    : type_(quant_bits ? dtype::u8 : type), head_dim_(head_dim), block_size_(block_size), capacity_(capacity_blocks),
      device_(device), device_id_(device_id), quant_bits_(quant_bits) {
  detail::ops_for(device);  // refuses a device this build does not have, before anything else
  if (device == device_kind::cuda && (device_id < 0 || device_id >= cuda_device_count()))
    fail_value("block_pool: CUDA device " + std::to_string(device_id) + " does not exist (" +
               std::to_string(cuda_device_count()) + " visible)");
  if (!dtype_is_float(type)) fail_type(std::string("block_pool dtype must be float32, float16 or bfloat16, got ") + dtype_name(type));
  if (head_dim <= 0 || head_dim > 4096) fail_value("head_dim must be in [1, 4096], got " + std::to_string(head_dim));
  if (block_size <= 0 || block_size > 4096) fail_value("block_size must be in [1, 4096], got " + std::to_string(block_size));
  if (capacity_blocks <= 0 || capacity_blocks > (int64_t(1) << 30))
    fail_value("capacity_blocks must be in [1, 2^30], got " + std::to_string(capacity_blocks));
  if (quant_bits != 0) {
    quant_ = make_quant_layout(quant_bits, block_size, head_dim);  // validates bits and head_dim
    value_offset_ = 0;
    block_bytes_ = round_up(quant_.bytes, kAlign);
  } else {
    value_offset_ = round_up(static_cast<size_t>(block_size) * head_dim * dtype_size(type), kAlign);
    block_bytes_ = 2 * value_offset_;
  }
  if (chunk_blocks <= 0) {
    // About 4 MiB per arena chunk, at least one block.
    chunk_blocks = std::max<int64_t>(1, static_cast<int64_t>((size_t(4) << 20) / block_bytes_));
  }
  chunk_blocks_ = std::min(chunk_blocks, capacity_blocks);
  n_chunk_slots_ = (capacity_ + chunk_blocks_ - 1) / chunk_blocks_;
  chunks_.reset(new char*[n_chunk_slots_]());
}

block_pool::~block_pool() {
  const detail::device_ops& ops = detail::ops_for(device_);
  for (int64_t i = 0; i < n_chunks_; ++i) ops.arena_free(device_id_, chunks_[i]);
}

void block_pool::grow_locked(int64_t need_free) {
  while (static_cast<int64_t>(free_list_.size()) < need_free) {
    assert(n_chunks_ < n_chunk_slots_);
    const int64_t first = n_chunks_ * chunk_blocks_;
    const int64_t count = std::min(chunk_blocks_, capacity_ - first);
    void* mem = detail::ops_for(device_).arena_alloc(device_id_, round_up(static_cast<size_t>(count) * block_bytes_, kAlign));
    if (!mem)
      throw capacity_error(std::string("block_pool: the ") + detail::ops_for(device_).name() + " refused memory for " +
                           std::to_string(count) + " more blocks");
    chunks_[n_chunks_] = static_cast<char*>(mem);
    ++n_chunks_;
    refcount_.resize(static_cast<size_t>(first + count), 0);
    // Hand out low ids first: push in reverse so pop_back yields `first` next.
    for (int64_t id = first + count - 1; id >= first; --id) free_list_.push_back(static_cast<block_id>(id));
  }
}

void block_pool::alloc(int64_t n, block_id* out) {
  if (n < 0) fail_value("block_pool::alloc: negative count");
  if (n == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (used_ + n > capacity_)
    throw capacity_error("block pool exhausted: need " + std::to_string(n) + " more blocks, " +
                         std::to_string(capacity_ - used_) + " of " + std::to_string(capacity_) +
                         " free (raise the pool capacity or evict/drop sequences)");
  grow_locked(n);
  for (int64_t i = 0; i < n; ++i) {
    const block_id id = free_list_.back();
    free_list_.pop_back();
    assert(refcount_[id] == 0);
    refcount_[id] = 1;
    out[i] = id;
  }
  used_ += n;
}

void block_pool::check_id(block_id id) const {
  if (id < 0 || static_cast<size_t>(id) >= refcount_.size() || refcount_[id] <= 0)
    fail_index("block_pool: block " + std::to_string(id) + " is not allocated");
}

void block_pool::incref(block_id id) { incref_many(&id, 1); }

void block_pool::incref_many(const block_id* ids, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_id(ids[i]);
  for (size_t i = 0; i < n; ++i) ++refcount_[ids[i]];
}

void block_pool::decref(block_id id) { decref_many(&id, 1); }

void block_pool::decref_many(const block_id* ids, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_id(ids[i]);
  for (size_t i = 0; i < n; ++i) {
    // check_id above cannot see duplicates driving a count below zero; guard here.
    if (refcount_[ids[i]] <= 0) fail_index("block_pool: double release of block " + std::to_string(ids[i]));
    if (--refcount_[ids[i]] == 0) {
      free_list_.push_back(ids[i]);
      --used_;
    }
  }
}

int32_t block_pool::refcount(block_id id) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (id < 0 || static_cast<size_t>(id) >= refcount_.size()) return 0;
  return refcount_[id];
}

void* block_pool::block_keys(block_id id) const {
  assert(id >= 0 && id < capacity_);
  const int64_t c = id / chunk_blocks_;
  return chunks_[c] + static_cast<size_t>(id - c * chunk_blocks_) * block_bytes_;
}

int64_t block_pool::used_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

int64_t block_pool::free_blocks() const { return capacity_ - used_blocks(); }

size_t block_pool::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<size_t>(refcount_.size()) * block_bytes_;
}

namespace detail {

const void* block_on_host(const block_pool& pool, block_id b, std::vector<char>& buf) {
  if (pool.device() == device_kind::cpu) return pool.block_keys(b);
  buf.resize(pool.block_bytes());
  ops_for(pool.device()).to_host(pool.device_id(), buf.data(), pool.block_keys(b), pool.block_bytes());
  return buf.data();
}

void block_from_host(const block_pool& pool, block_id b, const void* src) {
  ops_for(pool.device()).from_host(pool.device_id(), pool.block_keys(b), src, pool.block_bytes());
}

}  // namespace detail
}  // namespace kvloom
