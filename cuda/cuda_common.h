// Internal to cuda/: what the backend's translation units share (errors, the current device
// and stream, uploads through the pinned staging ring, launch sizing).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "device.h"
#include "launch.h"

namespace kvloom {
namespace detail {
namespace cu {

[[noreturn]] void fail(cudaError_t e, const char* what);

#define KV_CUDA(expr)                                  \
  do {                                                 \
    const cudaError_t e_ = (expr);                     \
    if (e_ != cudaSuccess) ::kvloom::detail::cu::fail(e_, #expr); \
  } while (0)

inline cudaStream_t stream() { return static_cast<cudaStream_t>(current_stream()); }

// Makes `id` the current device for a scope.
struct device_scope {
  int prev = -1;
  explicit device_scope(int id) {
    KV_CUDA(cudaGetDevice(&prev));
    if (prev != id) KV_CUDA(cudaSetDevice(id));
  }
  ~device_scope() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
  }
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;
};

// Copies `bytes` of host data into new stream-ordered device memory on `s` (free it with
// release() on the same stream, after the kernels that read it). The copy goes through a pinned
// staging ring: the host buffer may be reused at once, and the call waits for the GPU only
// when the ring is full of copies the GPU has not started.
void* upload(const void* host, size_t bytes, int device, cudaStream_t s);
// Stream-ordered device memory (descriptors, scratch, table mirrors) from kvloom's own pool on
// the current device. The pool keeps what is freed: the default pool's release threshold is 0,
// so it hands freed memory back to the driver at every synchronisation, and a decode step after
// one (a token read by the host) would map its scratch memory again, for every call.
cudaError_t malloc_async(void** p, size_t bytes, cudaStream_t s);
// Pinned host buffers for asynchronous readbacks, reused: take_pinned gives one of at least
// `bytes` (its capacity in *cap), give_pinned takes it back once no copy into it is pending.
void* take_pinned(size_t bytes, size_t* cap);
void give_pinned(void* p, size_t cap);
// Frees every device's staging ring, the free pinned readback buffers, and trims kvloom's pools
// (kvloom::cuda_release_cached_memory).
void release_cached_memory();

template <class T>
T* upload_vec(const std::vector<T>& v, int device, cudaStream_t s) {
  return static_cast<T*>(upload(v.data(), v.size() * sizeof(T), device, s));
}

inline void release(const void* dev, cudaStream_t s) {
  if (dev) KV_CUDA(cudaFreeAsync(const_cast<void*>(dev), s));
}

inline int grid_for(int64_t work, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 65535 * 4)));
}

int sm_count(int device);

}  // namespace cu
}  // namespace detail
}  // namespace kvloom
