// Internal: the device seam. One cache, sequence and plan implementation serves every
// device; where block memory lives and how bytes move in and out of blocks is the only thing
// that differs, and it goes through a device_ops (the host one here, the CUDA one in cuda/).
// Slot metadata (block tables, live flags, ords, positions, classes, scores) always stays on
// the host; block memory may be device memory that host code never dereferences.
//
// Work is issued on the calling thread's current stream (kvloom/device.h); the host ops are
// synchronous, the CUDA ops asynchronous on that stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvloom/block_pool.h"
#include "kvloom/common.h"
#include "kvloom/device.h"
#include "kvloom/tensor_view.h"

namespace kvloom {
struct head_store;
namespace detail {

// Byte spans of equal size to copy (copy-on-write blocks, compaction rows).
struct span_copy {
  void* dst;
  const void* src;
};

// One appended token of one head: row `token` of head `head` of the source k/v tensors
// ([n_kv_heads, n, D]) goes to these block rows.
struct row_write {
  void* k_dst;
  void* v_dst;
  int32_t head;
  int32_t token;
};

// One gathered token: these block rows go to row i (its index in the list) of the outputs.
struct row_read {
  const void* k_src;
  const void* v_src;
};

class device_ops {
 public:
  virtual ~device_ops() = default;
  virtual const char* name() const = 0;
  // Arena memory for block pools: nullptr when the device refuses.
  virtual void* arena_alloc(int device_id, size_t bytes) const = 0;
  virtual void arena_free(int device_id, void* p) const = 0;
  // Copies every span (each `bytes` long); spans do not overlap each other.
  virtual void copy_spans(int device_id, const std::vector<span_copy>& spans, size_t bytes) const = 0;
  // Writes k/v rows (any float dtype, strided, on this device) into block rows of `dst_type`.
  virtual void write_rows(int device_id, const tensor_view& k, const tensor_view& v, const std::vector<row_write>& rows,
                          dtype dst_type, int64_t D) const = 0;
  // Reads block rows of `src_type` into row i of k_out/v_out ([rows, D], any float dtype, on this device).
  virtual void read_rows(int device_id, const std::vector<row_read>& rows, dtype src_type, int64_t D,
                         const tensor_view& k_out, const tensor_view& v_out) const = 0;
  // Copies device bytes to host memory and waits for them (statistics that run on the host).
  virtual void to_host(int device_id, void* host_dst, const void* src, size_t bytes) const = 0;
  // Copies host bytes to device memory; the host buffer may be reused when it returns.
  virtual void from_host(int device_id, void* dst, const void* host_src, size_t bytes) const = 0;
  // Block rows of `src_type` (D elements each) converted to fp32 into host memory [rows, D];
  // waits for them (the prompt statistics run on the host from these).
  virtual void rows_to_host_f32(int device_id, const std::vector<const void*>& rows, dtype src_type, int64_t D,
                                float* host_out) const = 0;
};

const device_ops& host_ops();
const device_ops* cuda_ops();  // null when kvloom was built without CUDA
// The ops of a device kind; std::invalid_argument when that device is not built in.
const device_ops& ops_for(device_kind kind);

// A block's bytes (block_bytes(), from block_keys()) readable on the host: the block itself in
// a host pool, else a copy in `buf` (waits for it). Quantized blocks are read this way.
const void* block_on_host(const block_pool& pool, block_id b, std::vector<char>& buf);
// Writes a whole block (block_bytes()) from host memory.
void block_from_host(const block_pool& pool, block_id b, const void* src);

// A tensor readable on the host: the tensor itself on the host, else a host copy of the
// elements it spans (any strides; waits for the copy), viewed with the same strides.
struct host_tensor {
  tensor_view view;
  std::vector<char> bytes;
};
host_tensor tensor_on_host(const tensor_view& t);

// Keys (and, with v_out, values) of a head store's slots as fp32 rows on the host
// ([slots.size(), D] each, in the order given), whichever device the blocks live on: the
// full-precision rows in one batched read, each sealed block of `qpool` (null: none) read and
// dequantized once.
void store_rows_f32(const head_store& hs, const block_pool& pool, const block_pool* qpool,
                    const std::vector<int64_t>& slots, float* k_out, float* v_out);

// The current stream of the calling thread (a cudaStream_t; null: the legacy default stream).
void* current_stream();

}  // namespace detail
}  // namespace kvloom
