// The CUDA side of the device seam (cpp/src/device.h) and the prompt statistics; attention
// (decode and chunks, over device-mirrored block tables) is in attention.cu.
//
// Block memory lives in cudaMalloc arenas; everything that moves bytes in or out of blocks is
// a kernel on the calling thread's current stream. Descriptors (which rows go where) are built
// on the host from the cache's metadata and uploaded through a pinned staging ring (an upload
// waits only when the ring is full of copies the GPU has not started). Shared math (fp16/bf16
// conversion) is the __host__ __device__ code the CPU paths use.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_backend.h"
#include "cuda_info.h"
#include "cuda_common.h"
#include "kvloom/device.h"

#ifndef KVLOOM_CUDA_ARCHS
#define KVLOOM_CUDA_ARCHS ""
#endif

namespace kvloom {

namespace detail {
namespace cu {

void fail(cudaError_t e, const char* what) {
  throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

namespace {

// A pinned host ring for uploads: slot i is reused only after the copy recorded on its event
// has run, so a host buffer is never overwritten while the GPU may still read it.
class staging_ring {
 public:
  static constexpr size_t kSlotBytes = size_t(1) << 20;
  static constexpr int kSlots = 16;

  void* upload(const void* host, size_t bytes, cudaStream_t s) {
    void* dev = nullptr;
    KV_CUDA(cudaMallocAsync(&dev, std::max<size_t>(bytes, 16), s));
    if (bytes == 0) return dev;
    std::lock_guard<std::mutex> lock(mu_);
    init_locked();
    size_t done = 0;
    while (done < bytes) {
      const size_t n = std::min(kSlotBytes, bytes - done);
      const int slot = next_;
      next_ = (next_ + 1) % kSlots;
      KV_CUDA(cudaEventSynchronize(events_[slot]));  // returns at once unless the ring is saturated
      std::memcpy(host_[slot], static_cast<const char*>(host) + done, n);
      KV_CUDA(cudaMemcpyAsync(static_cast<char*>(dev) + done, host_[slot], n, cudaMemcpyHostToDevice, s));
      KV_CUDA(cudaEventRecord(events_[slot], s));
      done += n;
    }
    return dev;
  }

 private:
  void init_locked() {
    if (ready_) return;
    for (int i = 0; i < kSlots; ++i) {
      KV_CUDA(cudaHostAlloc(&host_[i], kSlotBytes, cudaHostAllocDefault));
      KV_CUDA(cudaEventCreateWithFlags(&events_[i], cudaEventDisableTiming));
    }
    ready_ = true;
  }
  std::mutex mu_;
  bool ready_ = false;
  int next_ = 0;
  void* host_[kSlots] = {};
  cudaEvent_t events_[kSlots] = {};
};

staging_ring& ring_for(int device) {
  static std::mutex mu;
  static auto* rings = new std::vector<staging_ring*>();  // one per device, for the life of the process
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(rings->size()) <= device) rings->resize(static_cast<size_t>(device) + 1, nullptr);
  if (!(*rings)[device]) (*rings)[device] = new staging_ring();
  return *(*rings)[device];
}

}  // namespace

void* upload(const void* host, size_t bytes, int device, cudaStream_t s) { return ring_for(device).upload(host, bytes, s); }

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return 80;
  if (!cached[device]) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 80;
    cached[device] = n;
  }
  return cached[device];
}

}  // namespace cu
}  // namespace detail

namespace {

using detail::cu::device_scope;
using detail::cu::grid_for;
using detail::cu::release;
using detail::cu::stream;
using detail::cu::upload_vec;

// --- data movement kernels -----------------------------------------------------------------
template <class W>
__global__ void copy_spans_kernel(const detail::span_copy* spans, int64_t n_spans, int64_t words) {
  const int64_t total = n_spans * words;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const detail::span_copy s = spans[i / words];
    static_cast<W*>(s.dst)[i % words] = static_cast<const W*>(s.src)[i % words];
  }
}

struct src3 {  // a [H, n, D] source: element (h, j, d) at data + h*s0 + j*s1 + d*s2 elements
  const void* k;
  const void* v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  dtype type;
};

__global__ void write_rows_kernel(const detail::row_write* rows, int64_t n_rows, src3 src, dtype dst_type, int64_t D) {
  const int64_t total = n_rows * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const detail::row_write r = rows[i / D];
    const int64_t d = i % D;
    const float kv = load_as_f32(src.k, src.type, static_cast<size_t>(r.head * src.ks0 + r.token * src.ks1 + d * src.ks2));
    const float vv = load_as_f32(src.v, src.type, static_cast<size_t>(r.head * src.vs0 + r.token * src.vs1 + d * src.vs2));
    store_from_f32(r.k_dst, dst_type, static_cast<size_t>(d), kv);
    store_from_f32(r.v_dst, dst_type, static_cast<size_t>(d), vv);
  }
}

struct dst2 {  // a [rows, D] destination: element (i, d) at data + i*s0 + d*s1 elements
  void* k;
  void* v;
  int64_t ks0, ks1, vs0, vs1;
  dtype type;
};

__global__ void read_rows_kernel(const detail::row_read* rows, int64_t n_rows, dtype src_type, int64_t D, dst2 out) {
  const int64_t total = n_rows * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, d = i % D;
    const detail::row_read r = rows[row];
    store_from_f32(out.k, out.type, static_cast<size_t>(row * out.ks0 + d * out.ks1), load_as_f32(r.k_src, src_type, d));
    if (out.v)
      store_from_f32(out.v, out.type, static_cast<size_t>(row * out.vs0 + d * out.vs1), load_as_f32(r.v_src, src_type, d));
  }
}

class cuda_device_ops final : public detail::device_ops {
 public:
  const char* name() const override { return "CUDA device"; }

  void* arena_alloc(int device_id, size_t bytes) const override {
    device_scope ds(device_id);
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state of a failed allocation
      return nullptr;
    }
    return p;
  }

  void arena_free(int device_id, void* p) const override {
    device_scope ds(device_id);
    cudaDeviceSynchronize();  // no kernel may still use the arena
    cudaFree(p);
  }

  void copy_spans(int device_id, const std::vector<detail::span_copy>& spans, size_t bytes) const override {
    if (spans.empty() || bytes == 0) return;
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    auto* d = upload_vec(spans, device_id, s);
    const int threads = 256;
    if (bytes % 16 == 0) {
      const int64_t words = static_cast<int64_t>(bytes / 16);
      KVLOOM_LAUNCH(copy_spans_kernel<uint4>, grid_for(static_cast<int64_t>(spans.size()) * words, threads), threads, 0, s)(
          d, static_cast<int64_t>(spans.size()), words);
    } else if (bytes % 4 == 0) {
      const int64_t words = static_cast<int64_t>(bytes / 4);
      KVLOOM_LAUNCH(copy_spans_kernel<uint32_t>, grid_for(static_cast<int64_t>(spans.size()) * words, threads), threads, 0, s)(
          d, static_cast<int64_t>(spans.size()), words);
    } else {
      const int64_t words = static_cast<int64_t>(bytes);
      KVLOOM_LAUNCH(copy_spans_kernel<uint8_t>, grid_for(static_cast<int64_t>(spans.size()) * words, threads), threads, 0, s)(
          d, static_cast<int64_t>(spans.size()), words);
    }
    KV_CUDA(cudaGetLastError());
    release(d, s);
  }

  void write_rows(int device_id, const tensor_view& k, const tensor_view& v, const std::vector<detail::row_write>& rows,
                  dtype dst_type, int64_t D) const override {
    if (rows.empty()) return;
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    auto* d = upload_vec(rows, device_id, s);
    const src3 src{k.data, v.data, k.strides[0], k.strides[1], k.strides[2], v.strides[0], v.strides[1], v.strides[2], k.type};
    if (k.type != v.type) fail_type("k and v must share one dtype");
    const int threads = 256;
    KVLOOM_LAUNCH(write_rows_kernel, grid_for(static_cast<int64_t>(rows.size()) * D, threads), threads, 0, s)(
        d, static_cast<int64_t>(rows.size()), src, dst_type, D);
    KV_CUDA(cudaGetLastError());
    release(d, s);
  }

  void read_rows(int device_id, const std::vector<detail::row_read>& rows, dtype src_type, int64_t D,
                 const tensor_view& k_out, const tensor_view& v_out) const override {
    if (rows.empty()) return;
    if (k_out.type != v_out.type) fail_type("gather outputs must share one dtype");
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    auto* d = upload_vec(rows, device_id, s);
    const dst2 out{k_out.data, v_out.data, k_out.strides[0], k_out.strides[1], v_out.strides[0], v_out.strides[1], k_out.type};
    const int threads = 256;
    KVLOOM_LAUNCH(read_rows_kernel, grid_for(static_cast<int64_t>(rows.size()) * D, threads), threads, 0, s)(
        d, static_cast<int64_t>(rows.size()), src_type, D, out);
    KV_CUDA(cudaGetLastError());
    release(d, s);
  }

  void to_host(int device_id, void* host_dst, const void* src, size_t bytes) const override {
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    KV_CUDA(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, s));
    KV_CUDA(cudaStreamSynchronize(s));
  }

  void from_host(int device_id, void* dst, const void* host_src, size_t bytes) const override {
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    KV_CUDA(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, s));
    KV_CUDA(cudaStreamSynchronize(s));  // the caller may free host_src right away
  }

  void rows_to_host_f32(int device_id, const std::vector<const void*>& rows, dtype src_type, int64_t D,
                        float* host_out) const override {
    if (rows.empty()) return;
    device_scope ds(device_id);
    const cudaStream_t s = stream();
    std::vector<detail::row_read> rr(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) rr[i] = {rows[i], rows[i]};
    auto* d = upload_vec(rr, device_id, s);
    void* scratch = nullptr;
    const size_t bytes = rows.size() * static_cast<size_t>(D) * sizeof(float);
    KV_CUDA(cudaMallocAsync(&scratch, bytes, s));
    const dst2 out{scratch, nullptr, D, 1, 0, 0, dtype::f32};
    const int threads = 256;
    KVLOOM_LAUNCH(read_rows_kernel, grid_for(static_cast<int64_t>(rows.size()) * D, threads), threads, 0, s)(
        d, static_cast<int64_t>(rows.size()), src_type, D, out);
    KV_CUDA(cudaGetLastError());
    KV_CUDA(cudaMemcpyAsync(host_out, scratch, bytes, cudaMemcpyDeviceToHost, s));
    release(scratch, s);
    release(d, s);
    KV_CUDA(cudaStreamSynchronize(s));
  }
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// --- prompt statistics ---------------------------------------------------------------------
struct stats_args {
  const void* q;
  int64_t qs0, qs1, qs2, qs3;  // q [B, Hq, Tq, D]
  dtype q_type;
  dtype kv_type;
  int64_t Tq;
  int64_t t0;  // first query token of this launch
  int G, D;
  float qscale;  // scale * log2(e)
  const detail::stat_head* heads;
  const detail::stat_key* keys;
  int mode;
  int64_t local_window;
  float* acc;    // mode 0: [total keys]
  double* mass;  // mode 1: [n_heads * 5]
};

constexpr int kStatThreads = 128;

// Block-wide reduction of (max, sum of exp2(x - max)) pairs.
__device__ void reduce_max_sum(float& m, float& l, float* red) {
  red[threadIdx.x] = m;
  red[kStatThreads + threadIdx.x] = l;
  __syncthreads();
  for (int off = kStatThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      const float m1 = red[threadIdx.x], m2 = red[threadIdx.x + off];
      const float l1 = red[kStatThreads + threadIdx.x], l2 = red[kStatThreads + threadIdx.x + off];
      const float mx = fmaxf(m1, m2);
      const float lsum = (m1 == kNegInf ? 0.f : l1 * exp2f(m1 - mx)) + (m2 == kNegInf ? 0.f : l2 * exp2f(m2 - mx));
      red[threadIdx.x] = mx;
      red[kStatThreads + threadIdx.x] = lsum;
    }
    __syncthreads();
  }
  m = red[0];
  l = red[kStatThreads];
  __syncthreads();
}

// Grid (heads, query tokens): one block per (head, query token), every query of its group.
// Pass 1 finds the softmax max and sum over the visible keys; pass 2 recomputes the scores
// and adds each key's probability (mode 0) or the mass per FastGen level (mode 1).
__global__ void prompt_stats_kernel(stats_args a) {
  __shared__ float qrow[512];
  __shared__ float red[2 * kStatThreads];
  __shared__ double mred[4 * kStatThreads];
  const detail::stat_head hd = a.heads[blockIdx.x];
  const int64_t t = a.t0 + blockIdx.y;
  const int64_t q_ord = hd.appended - a.Tq + t;
  // visible keys: those with ord <= q_ord (keys are in ord order)
  int64_t lo = 0, hi = hd.n_keys;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a.keys[hd.first_key + mid].ord <= q_ord) lo = mid + 1;
    else hi = mid;
  }
  const int64_t n_vis = lo;
  if (n_vis == 0) return;
  for (int g = 0; g < a.G; ++g) {
    for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
      const size_t qi = static_cast<size_t>(hd.b * a.qs0 + (hd.h * a.G + g) * a.qs1 + t * a.qs2 + d * a.qs3);
      qrow[d] = load_as_f32(a.q, a.q_type, qi) * a.qscale;
    }
    __syncthreads();
    float m = kNegInf, l = 0.f;
    for (int64_t j = threadIdx.x; j < n_vis; j += blockDim.x) {
      const void* kr = a.keys[hd.first_key + j].k;
      float dot = 0.f;
      for (int d = 0; d < a.D; ++d) dot += qrow[d] * load_as_f32(kr, a.kv_type, static_cast<size_t>(d));
      if (dot > m) {
        l = (m == kNegInf ? 0.f : l * exp2f(m - dot)) + 1.f;
        m = dot;
      } else {
        l += exp2f(dot - m);
      }
    }
    reduce_max_sum(m, l, red);
    const float inv = 1.f / l;
    double part[4] = {0, 0, 0, 0};
    for (int64_t j = threadIdx.x; j < n_vis; j += blockDim.x) {
      const detail::stat_key key = a.keys[hd.first_key + j];
      float dot = 0.f;
      for (int d = 0; d < a.D; ++d) dot += qrow[d] * load_as_f32(key.k, a.kv_type, static_cast<size_t>(d));
      const float p = exp2f(dot - m) * inv;
      if (a.mode == 0) {
        atomicAdd(a.acc + hd.first_key + j, p);
      } else if (key.level < 3 || q_ord - key.ord < a.local_window) {
        part[key.level] += p;
      }
    }
    if (a.mode == 1) {
      for (int i = 0; i < 4; ++i) mred[i * kStatThreads + threadIdx.x] = part[i];
      __syncthreads();
      for (int off = kStatThreads / 2; off > 0; off >>= 1) {
        if (threadIdx.x < off)
          for (int i = 0; i < 4; ++i) mred[i * kStatThreads + threadIdx.x] += mred[i * kStatThreads + threadIdx.x + off];
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        for (int i = 0; i < 4; ++i) atomicAdd(a.mass + blockIdx.x * 5 + i, mred[i * kStatThreads]);
        atomicAdd(a.mass + blockIdx.x * 5 + 4, 1.0);
      }
    }
    __syncthreads();
  }
}

}  // namespace

namespace detail {

const device_ops* cuda_ops() {
  static const cuda_device_ops ops;
  return &ops;
}

void cuda_prompt_stats(const tensor_view& q, int64_t G, dtype kv_type, int64_t D, const std::vector<stat_head>& heads,
                       const std::vector<stat_key>& keys, float scale, int mode, int64_t local_window, float* out_acc,
                       double* out_mass) {
  if (D > 512) fail_value("the CUDA prompt statistics support head_dim up to 512, got " + std::to_string(D));
  if (heads.empty()) return;
  const int64_t Tq = q.shape[2];
  if (Tq == 0) return;
  device_scope ds(q.device_id);
  const cudaStream_t s = stream();
  stats_args a{};
  a.q = q.data;
  a.qs0 = q.strides[0];
  a.qs1 = q.strides[1];
  a.qs2 = q.strides[2];
  a.qs3 = q.strides[3];
  a.q_type = q.type;
  a.kv_type = kv_type;
  a.Tq = Tq;
  a.G = static_cast<int>(G);
  a.D = static_cast<int>(D);
  a.qscale = scale * 1.4426950408889634f;
  a.heads = upload_vec(heads, q.device_id, s);
  a.keys = keys.empty() ? nullptr : upload_vec(keys, q.device_id, s);
  a.mode = mode;
  a.local_window = local_window;
  const size_t acc_bytes = mode == 0 ? std::max<size_t>(keys.size(), 1) * sizeof(float) : 16;
  const size_t mass_bytes = mode == 1 ? heads.size() * 5 * sizeof(double) : 16;
  KV_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&a.acc), acc_bytes, s));
  KV_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&a.mass), mass_bytes, s));
  KV_CUDA(cudaMemsetAsync(a.acc, 0, acc_bytes, s));
  KV_CUDA(cudaMemsetAsync(a.mass, 0, mass_bytes, s));
  for (int64_t t0 = 0; t0 < Tq; t0 += 65535) {  // gridDim.y is at most 65535
    a.t0 = t0;
    const dim3 grid(static_cast<unsigned>(heads.size()), static_cast<unsigned>(std::min<int64_t>(65535, Tq - t0)));
    KVLOOM_LAUNCH(prompt_stats_kernel, grid, kStatThreads, 0, s)(a);
    KV_CUDA(cudaGetLastError());
  }
  if (mode == 0 && !keys.empty())
    KV_CUDA(cudaMemcpyAsync(out_acc, a.acc, keys.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
  if (mode == 1) KV_CUDA(cudaMemcpyAsync(out_mass, a.mass, mass_bytes, cudaMemcpyDeviceToHost, s));
  for (const void* p : {static_cast<const void*>(a.heads), static_cast<const void*>(a.keys),
                        static_cast<const void*>(a.acc), static_cast<const void*>(a.mass)})
    release(const_cast<void*>(p), s);
  KV_CUDA(cudaStreamSynchronize(s));  // the one synchronisation: the statistics update host metadata
}

}  // namespace detail

bool cuda_built() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_architectures() { return KVLOOM_CUDA_ARCHS; }

}  // namespace kvloom
