// A host simulator of the CUDA subset kvloom's backend uses, so the CUDA sources (cuda/*.cu)
// build as C++ and run on machines without a GPU (CMake option KVLOOM_CUDA_SIM; the C++ tests
// build it under AddressSanitizer + UBSan and under ThreadSanitizer). It stands in for
// <cuda_runtime.h>: this folder comes first on the include path of the simulated build.
//
// What it models:
// - "Device" memory is host memory; every copy, memset and kernel runs synchronously, so the
//   asynchronous API calls complete before they return (stream order holds trivially).
// - A kernel launch runs its blocks one after another; each block runs with one OS thread per
//   CUDA thread, so __syncthreads is a real barrier, a missing one is a data race the thread
//   sanitizer reports (what compute-sanitizer's racecheck finds on a GPU), and an out-of-bounds
//   read is a heap overflow AddressSanitizer reports (memcheck). Threads that return early leave
//   the block's barriers, as on the GPU. Warps are 32 consecutive threads; warp shuffles and
//   __syncwarp synchronise the warp's threads.
// - __shared__ variables are function-local statics (one block runs at a time, and launches
//   are serialised); dynamic shared memory is declared with KVLOOM_DYNAMIC_SMEM (cuda/launch.h).
// - One device (KVLOOM_CUDA_SIM_DEVICES overrides), 4 multiprocessors, 8 GiB.
//
// What it does not model: timing, the memory model beyond what barriers order, stream
// concurrency, warp divergence rules (a shuffle must be reached by every thread of the warp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

#define KVLOOM_CUDA_SIM 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInvalidDevice = 101 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct kvsim_stream;
struct kvsim_event;
struct kvsim_mem_pool;
typedef kvsim_stream* cudaStream_t;
typedef kvsim_event* cudaEvent_t;
typedef kvsim_mem_pool* cudaMemPool_t;
// stream-ordered memory pools (the simulator's allocate from device memory like cudaMalloc)
enum cudaMemAllocationType { cudaMemAllocationTypePinned = 1 };
enum cudaMemLocationType { cudaMemLocationTypeDevice = 1 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
struct cudaMemLocation {
  cudaMemLocationType type;
  int id;
};
struct cudaMemPoolProps {
  cudaMemAllocationType allocType;
  int handleTypes;
  cudaMemLocation location;
};
constexpr unsigned cudaHostAllocDefault = 0;
constexpr unsigned cudaEventDisableTiming = 2;
constexpr int warpSize = 32;

namespace kvsim {

extern thread_local uint3 t_thread_idx;
extern thread_local uint3 t_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

void sync_threads();
void sync_warp();
// Exchanges 8-byte words in the calling thread's warp: returns the word lane `src` offered.
uint64_t warp_exchange(uint64_t mine, int src);
int lane_id();
void* dynamic_smem();
// Dynamic shared memory a kernel may ask for (48 KiB unless raised, at most the device's 227 KiB).
void set_max_dynamic_smem(const void* kernel, int bytes);
size_t max_dynamic_smem(const void* kernel);

// Runs body() on every thread of every block of the grid (see the header comment); a launch
// configuration the GPU would refuse sets the last error instead (cudaGetLastError).
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem_bytes, size_t smem_limit, const std::function<void()>& body);

template <class... P>
struct launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    std::tuple<P...> bound(std::forward<A>(args)...);  // converted once, as the GPU copies them
    auto k = kernel;
    run_grid(grid, block, smem, max_dynamic_smem(reinterpret_cast<const void*>(k)), [&] { std::apply(k, bound); });
  }
};

template <class... P>
launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return launcher<P...>{kernel, grid, block, smem};
}

template <class T>
T bits_as(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof(T));
  return v;
}
template <class T>
uint64_t as_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  return w;
}

}  // namespace kvsim

#define threadIdx (::kvsim::t_thread_idx)
#define blockIdx (::kvsim::t_block_idx)
#define blockDim (::kvsim::g_block_dim)
#define gridDim (::kvsim::g_grid_dim)

inline void __syncthreads() { kvsim::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { kvsim::sync_warp(); }
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = kvsim::lane_id();
  return kvsim::bits_as<T>(kvsim::warp_exchange(kvsim::as_bits(v), (lane / width) * width + src % width));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = kvsim::lane_id();
  const int src = lane ^ mask;
  return kvsim::bits_as<T>(kvsim::warp_exchange(kvsim::as_bits(v), (src / width == lane / width) ? src : lane));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = kvsim::lane_id();
  const int src = lane + static_cast<int>(delta);
  return kvsim::bits_as<T>(kvsim::warp_exchange(kvsim::as_bits(v), (src / width == lane / width) ? src : lane));
}

inline float atomicAdd(float* p, float v) {
  float old;
  uint32_t cur = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_RELAXED);
  for (;;) {
    std::memcpy(&old, &cur, 4);
    const float nv = old + v;
    uint32_t want;
    std::memcpy(&want, &nv, 4);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &cur, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old;
  }
}
inline double atomicAdd(double* p, double v) {
  double old;
  uint64_t cur = __atomic_load_n(reinterpret_cast<uint64_t*>(p), __ATOMIC_RELAXED);
  for (;;) {
    std::memcpy(&old, &cur, 8);
    const double nv = old + v;
    uint64_t want;
    std::memcpy(&want, &nv, 8);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint64_t*>(p), &cur, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old;
  }
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __fdividef(float a, float b) { return a / b; }
// exp2f, fmaxf, fminf, sinf, ... are the C library's (<cmath>).
template <class T>
T __ldg(const T* p) {
  return *p;
}

// --- the runtime API (host memory, synchronous) --------------------------------------------
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMemPoolCreate(cudaMemPool_t* pool, const cudaMemPoolProps* props);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t pool, size_t keep);
cudaError_t cudaMallocFromPoolAsync(void** p, size_t bytes, cudaMemPool_t pool, cudaStream_t s);
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned flags);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  kvsim::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
template <class T>
cudaError_t cudaMallocAsync(T** p, size_t bytes, cudaStream_t s) {
  return cudaMallocAsync(reinterpret_cast<void**>(p), bytes, s);
}
