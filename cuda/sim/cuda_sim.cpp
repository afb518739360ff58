// The host simulator of cuda_runtime.h (see the comment there): grids run block by block on a
// team of OS threads; the runtime API works on host memory and checks what a GPU would refuse
// (a host pointer where device memory is expected, an oversized launch) by returning errors.
#include "cuda_runtime.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace kvsim {

thread_local uint3 t_thread_idx{0, 0, 0};
thread_local uint3 t_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local int t_device = 0;

void set_error(cudaError_t e) {
  if (t_last_error == cudaSuccess) t_last_error = e;
}

// A reusable barrier whose members may leave it (as a CUDA thread that returned no longer
// takes part in the block's barriers).
class barrier {
 public:
  void reset(int n) {
    std::lock_guard<std::mutex> lk(mu_);
    expected_ = n;
    arrived_ = 0;
  }
  // The last thread to arrive runs on_last (if any) before it releases the others.
  template <class F = void (*)()>
  void arrive_and_wait(F on_last = nullptr) {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen = gen_.load(std::memory_order_relaxed);
      if (++arrived_ >= expected_) {
        if constexpr (!std::is_same_v<F, void (*)()>) on_last();
        release_locked();
        return;
      }
    }
    // Waiting threads yield rather than sleep: a block has far more threads than the machine
    // has cores, and a futex sleep and wake-up per thread per barrier is most of the cost.
    while (gen_.load(std::memory_order_acquire) == gen) std::this_thread::yield();
  }
  void drop() {
    std::lock_guard<std::mutex> lk(mu_);
    --expected_;
    if (expected_ > 0 && arrived_ >= expected_) release_locked();
  }

 private:
  void release_locked() {
    arrived_ = 0;
    gen_.fetch_add(1, std::memory_order_acq_rel);
  }
  std::mutex mu_;
  int expected_ = 0;
  int arrived_ = 0;
  std::atomic<uint64_t> gen_{0};
};

struct block_team {
  int n_threads = 0;
  barrier block;                 // __syncthreads
  std::vector<barrier> warps;    // __syncwarp and shuffles, one per warp
  std::vector<uint64_t> words;   // [2][n_threads] shuffle slots
  unsigned char* smem = nullptr; // dynamic shared memory
  int warp_size(int w) const { return std::min(32, n_threads - 32 * w); }
  void reset() {
    block.reset(n_threads);
    for (int w = 0; w < static_cast<int>(warps.size()); ++w) warps[w].reset(warp_size(w));
  }
};

thread_local block_team* t_team = nullptr;
thread_local int t_linear = 0;

block_team& team() {
  if (!t_team) {
    std::fprintf(stderr, "kvsim: a CUDA device function was called outside a kernel\n");
    std::abort();
  }
  return *t_team;
}

// The OS threads that play CUDA threads, kept between launches (creating a thousand threads per
// launch is most of the simulator's cost otherwise). run(n, fn) calls fn(i) on threads 0..n-1
// and returns when all have finished.
class worker_pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lk(mu_);
    while (static_cast<int>(threads_.size()) < n) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
    }
    job_ = &fn;
    active_ = n;
    pending_ = n;
    ++gen_;
    cv_.notify_all();
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }
  ~worker_pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& t : threads_) t.join();
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || (gen_ != seen && id < active_); });
        if (stop_) return;
        seen = gen_;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, pending_ = 0;
  uint64_t gen_ = 0;
  bool stop_ = false;
};

std::mutex g_launch_mu;  // one grid at a time: __shared__ statics belong to the running block
worker_pool g_workers;
std::mutex g_smem_mu;
std::map<const void*, size_t> g_smem_limit;

// Device allocations by address, to tell device pointers from host ones.
std::mutex g_mem_mu;
std::map<const char*, size_t> g_device_mem;
size_t g_device_bytes = 0;
constexpr size_t kDeviceBytes = size_t(8) << 30;

bool is_device(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mem_mu);
  const char* c = static_cast<const char*>(p);
  auto it = g_device_mem.upper_bound(c);
  if (it == g_device_mem.begin()) return false;
  --it;
  return c >= it->first && c + bytes <= it->first + it->second;
}

int device_count() {
  const char* e = std::getenv("KVLOOM_CUDA_SIM_DEVICES");
  return e ? std::atoi(e) : 1;
}

cudaError_t device_alloc(void** p, size_t bytes) {
  if (!p) return cudaErrorInvalidValue;
  const size_t n = std::max<size_t>(256, (bytes + 255) / 256 * 256);
  std::lock_guard<std::mutex> lk(g_mem_mu);
  if (g_device_bytes + n > kDeviceBytes) {
    *p = nullptr;
    return cudaErrorMemoryAllocation;
  }
  void* q = std::aligned_alloc(256, n);
  if (!q) return cudaErrorMemoryAllocation;
  std::memset(q, 0xff, n);  // fresh device memory is garbage: NaN patterns show reads of it
  g_device_mem[static_cast<const char*>(q)] = n;
  g_device_bytes += n;
  *p = q;
  return cudaSuccess;
}

cudaError_t device_free(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lk(g_mem_mu);
  auto it = g_device_mem.find(static_cast<const char*>(p));
  if (it == g_device_mem.end()) return cudaErrorInvalidValue;
  g_device_bytes -= it->second;
  g_device_mem.erase(it);
  std::free(p);
  return cudaSuccess;
}

cudaError_t copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  if (!dst || !src) return cudaErrorInvalidValue;
  const bool dd = is_device(dst, bytes), sd = is_device(src, bytes);
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dd && !sd; break;
    case cudaMemcpyDeviceToHost: ok = sd && !dd; break;
    case cudaMemcpyDeviceToDevice: ok = sd && dd; break;
    case cudaMemcpyHostToHost: ok = !sd && !dd; break;
    case cudaMemcpyDefault: break;
  }
  if (!ok) return cudaErrorInvalidValue;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

}  // namespace

void sync_threads() { team().block.arrive_and_wait(); }

void sync_warp() { team().warps[t_linear / 32].arrive_and_wait(); }

int lane_id() { return t_linear % 32; }

// Two slot sets used in turn: the barrier of exchange k + 1 (which every lane reaches only
// after reading exchange k) is what keeps exchange k + 2 from overwriting slots still read.
thread_local unsigned t_exchanges = 0;

uint64_t warp_exchange(uint64_t mine, int src) {
  block_team& tm = team();
  const int w = t_linear / 32;
  const size_t set = (t_exchanges++ & 1) * tm.words.size() / 2;
  tm.words[set + t_linear] = mine;
  tm.warps[w].arrive_and_wait();
  return src >= 0 && src < tm.warp_size(w) ? tm.words[set + w * 32 + src] : mine;
}

void* dynamic_smem() { return team().smem; }

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lk(g_smem_mu);
  g_smem_limit[kernel] = static_cast<size_t>(bytes);
}

size_t max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lk(g_smem_mu);
  auto it = g_smem_limit.find(kernel);
  return it == g_smem_limit.end() ? 48 * 1024 : it->second;
}

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, size_t smem_limit, const std::function<void()>& body) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || smem_bytes > smem_limit) {
    set_error(cudaErrorInvalidValue);  // cudaErrorInvalidConfiguration on a GPU
    return;
  }
  std::lock_guard<std::mutex> launch(g_launch_mu);
  g_block_dim = block;
  g_grid_dim = grid;
  block_team tm;
  tm.n_threads = static_cast<int>(nthreads);
  tm.warps = std::vector<barrier>(static_cast<size_t>((nthreads + 31) / 32));
  tm.words.assign(2 * nthreads, 0);
  std::vector<unsigned char> smem(std::max<size_t>(smem_bytes, 16) + 16);
  tm.smem = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  tm.reset();
  // every block ends at this barrier; its last thread resets the block's barriers for the next
  barrier end;
  end.reset(tm.n_threads);
  auto end_of_block = [&] {
    end.arrive_and_wait([&] {
      tm.reset();
      std::memset(tm.smem, 0xff, smem_bytes);  // the next block finds garbage, not the last one's data
    });
  };
  std::memset(tm.smem, 0xff, smem_bytes);
  g_workers.run(tm.n_threads, [&](int i) {
    t_team = &tm;
    t_linear = i;
    t_thread_idx = {static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                    static_cast<unsigned>(i) / (block.x * block.y)};
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          t_block_idx = {x, y, z};
          t_exchanges = 0;  // every lane of a warp starts the block on the same slot set
          body();
          tm.block.drop();  // this thread has left the block
          tm.warps[i / 32].drop();
          end_of_block();
        }
    t_team = nullptr;
  });
}

}  // namespace kvsim

using kvsim::copy;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (simulated device)";
    case cudaErrorInvalidValue: return "invalid argument (simulated device)";
    case cudaErrorMemoryAllocation: return "out of memory (simulated device)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (simulated device)";
  }
  return "unknown error (simulated device)";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = kvsim::t_last_error;
  kvsim::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = kvsim::device_count();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = kvsim::t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= kvsim::device_count()) return cudaErrorInvalidDevice;
  kvsim::t_device = d;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device < 0 || device >= kvsim::device_count()) return cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = 4; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 * 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaMalloc(void** p, size_t bytes) { return kvsim::device_alloc(p, bytes); }
cudaError_t cudaFree(void* p) { return kvsim::device_free(p); }
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return kvsim::device_alloc(p, bytes); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return kvsim::device_free(p); }

struct kvsim_mem_pool {
  int device;
};

cudaError_t cudaMemPoolCreate(cudaMemPool_t* pool, const cudaMemPoolProps* props) {
  if (!pool || !props || props->location.type != cudaMemLocationTypeDevice || props->location.id < 0 ||
      props->location.id >= kvsim::device_count())
    return cudaErrorInvalidValue;
  *pool = new kvsim_mem_pool{props->location.id};  // (pools live as long as the process)
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr, void* value) {
  return pool && value ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t pool, size_t) { return pool ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaMallocFromPoolAsync(void** p, size_t bytes, cudaMemPool_t pool, cudaStream_t) {
  if (!pool) return cudaErrorInvalidValue;
  return kvsim::device_alloc(p, bytes);
}

cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  *p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) { return copy(dst, src, bytes, kind); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return copy(dst, src, bytes, kind);
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (!kvsim::is_device(p, bytes)) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  static char token;
  *e = reinterpret_cast<cudaEvent_t>(&token);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
