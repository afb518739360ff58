// The CUDA side of the device seam (cpp/src/device.h) and CUDA decode attention.
//
// Block memory lives in cudaMalloc arenas; everything that moves bytes in or out of blocks is
// a kernel on the calling thread's current stream. Descriptors (which rows go where, which
// chunks a query reads) are built on the host from the cache's metadata and uploaded through
// a pinned staging ring (an upload waits only when the ring is full of copies the GPU has not
// started), so the decode path never waits for the GPU. Shared math (fp16/bf16 conversion,
// the online softmax in the log2 domain) is the __host__ __device__ code the CPU paths use.

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
#include "device.h"
#include "kvloom/device.h"
#include "launch.h"

#ifndef KVLOOM_CUDA_ARCHS
#define KVLOOM_CUDA_ARCHS ""
#endif

namespace kvloom {

namespace {

[[noreturn]] void cuda_fail(cudaError_t e, const char* what) {
  throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

#define KV_CUDA(expr)                          \
  do {                                         \
    const cudaError_t e_ = (expr);             \
    if (e_ != cudaSuccess) cuda_fail(e_, #expr); \
  } while (0)

cudaStream_t stream() { return static_cast<cudaStream_t>(detail::current_stream()); }

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
};

// A pinned host ring for uploads: slot i is reused only after the copy recorded on its event
// has run, so a host buffer is never overwritten while the GPU may still read it.
class staging_ring {
 public:
  static constexpr size_t kSlotBytes = size_t(1) << 20;
  static constexpr int kSlots = 16;

  // Copies `bytes` of host data into new stream-ordered device memory (freed with
  // cudaFreeAsync by the caller, on the same stream, after the kernels that read it).
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

template <class T>
T* upload_vec(const std::vector<T>& v, int device, cudaStream_t s) {
  return static_cast<T*>(ring_for(device).upload(v.data(), v.size() * sizeof(T), s));
}

void release(void* dev, cudaStream_t s) {
  if (dev) KV_CUDA(cudaFreeAsync(dev, s));
}

int grid_for(int64_t work, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 65535 * 4)));
}

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

// --- decode attention ---------------------------------------------------------------------
struct dchunk {
  const void* k;
  const void* v;
  int64_t k_stride, v_stride;  // elements between consecutive rows
  int32_t live_off;            // offset of its live mask in the mask area, -1: all live
  int32_t n;
  int32_t seg;
  int32_t pad_;
};

struct ditem {
  int32_t task;
  int32_t c0, c1;
  int32_t pad_;
};

struct dtask {
  int64_t b, h;
  int32_t first_item, n_items;
};

struct decode_args {
  const void* q;
  int64_t qs0, qs1, qs2;  // q [B, Hq, D] strides (elements)
  dtype q_type;
  dtype kv_type;
  void* out;
  int64_t os0, os1, os2;
  dtype out_type;
  const dchunk* chunks;
  const ditem* items;
  const dtask* tasks;
  const uint8_t* masks;
  const int64_t* deltas;  // [B * n_seg]
  int n_seg;
  const float* inv_freq;  // [n_freq]
  int n_freq;
  int G, D, max_n;
  float qscale;  // scale * log2(e): scores in the log2 domain
  float* partial;  // [n_items][G * (D + 2)]: m[G], l[G], acc[G][D]
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One work item: a range of chunks of one (row, kv head), every query of its group; writes the
// item's softmax state (running max m, sum l, weighted values acc) for the merge.
__global__ void decode_split_kernel(decode_args a) {
  KVLOOM_DYNAMIC_SMEM(float, sm);
  const int G = a.G, D = a.D;
  float* qbase = sm;                  // [G * D]
  float* qrot = qbase + G * D;        // [G * D]
  float* acc = qrot + G * D;          // [G * D]
  float* m = acc + G * D;             // [G]
  float* l = m + G;                   // [G]
  float* corr = l + G;                // [G]
  float* s = corr + G;                // [G * max_n]
  const ditem it = a.items[blockIdx.x];
  const dtask t = a.tasks[it.task];
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    const size_t qi = static_cast<size_t>(t.b * a.qs0 + (t.h * G + g) * a.qs1 + d * a.qs2);
    qbase[e] = load_as_f32(a.q, a.q_type, qi) * a.qscale;
    acc[e] = 0.f;
  }
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    m[g] = kNegInf;
    l[g] = 0.f;
  }
  __syncthreads();
  int cur_seg = -1;
  const float* q = qbase;
  for (int c = it.c0; c < it.c1; ++c) {
    const dchunk ch = a.chunks[c];
    if (ch.seg != cur_seg) {
      cur_seg = ch.seg;
      const int64_t delta = a.deltas ? a.deltas[t.b * a.n_seg + cur_seg] : 0;
      if (delta == 0 || a.n_freq == 0) {
        q = qbase;
      } else {
        const int nf = a.n_freq;
        for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
          const int g = e / D, d = e % D;
          const float* x = qbase + g * D;
          float y;
          if (d < nf) {
            const double ang = static_cast<double>(delta) * static_cast<double>(a.inv_freq[d]);
            y = x[d] * static_cast<float>(cos(ang)) - x[d + nf] * static_cast<float>(sin(ang));
          } else if (d < 2 * nf) {
            const double ang = static_cast<double>(delta) * static_cast<double>(a.inv_freq[d - nf]);
            y = x[d] * static_cast<float>(cos(ang)) + x[d - nf] * static_cast<float>(sin(ang));
          } else {
            y = x[d];
          }
          qrot[e] = y;
        }
        q = qrot;
      }
      __syncthreads();
    }
    const uint8_t* live = ch.live_off >= 0 ? a.masks + ch.live_off : nullptr;
    // scores of every (query, key) pair of the chunk
    for (int p = threadIdx.x; p < G * ch.n; p += blockDim.x) {
      const int g = p / ch.n, r = p % ch.n;
      float dot = kNegInf;
      if (!live || live[r]) {
        dot = 0.f;
        const float* qg = q + g * D;
        for (int d = 0; d < D; ++d) dot += qg[d] * load_as_f32(ch.k, a.kv_type, static_cast<size_t>(r * ch.k_stride + d));
      }
      s[g * a.max_n + r] = dot;
    }
    __syncthreads();
    // online softmax: new running max, the correction of the old state, probabilities
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      float mx = m[g];
      for (int r = 0; r < ch.n; ++r) mx = fmaxf(mx, s[g * a.max_n + r]);
      float sum = 0.f;
      for (int r = 0; r < ch.n; ++r) {
        const float x = s[g * a.max_n + r];
        const float p = x == kNegInf ? 0.f : exp2f(x - mx);
        s[g * a.max_n + r] = p;
        sum += p;
      }
      const float cr = m[g] == kNegInf ? (mx == kNegInf ? 1.f : 0.f) : exp2f(m[g] - mx);
      corr[g] = cr;
      l[g] = l[g] * cr + sum;
      m[g] = mx;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
      const int g = e / D, d = e % D;
      float x = acc[e] * corr[g];
      for (int r = 0; r < ch.n; ++r) {
        if (live && !live[r]) continue;  // evicted rows are never read
        const float p = s[g * a.max_n + r];
        x += p * load_as_f32(ch.v, a.kv_type, static_cast<size_t>(r * ch.v_stride + d));
      }
      acc[e] = x;
    }
    __syncthreads();
  }
  float* out = a.partial + static_cast<size_t>(blockIdx.x) * (G * (D + 2));
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    out[g] = m[g];
    out[G + g] = l[g];
  }
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) out[2 * G + e] = acc[e];
}

// Merges the items of one (row, kv head) and writes out = acc / l in the output dtype (zeros
// for a head with no live key, the zero-weighted sum of values where every score is -inf; NaN
// where a score was NaN).
__global__ void decode_merge_kernel(decode_args a) {
  const dtask t = a.tasks[blockIdx.x];
  const int G = a.G, D = a.D, state = G * (D + 2);
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    float M = kNegInf;
    bool poisoned = false;  // a NaN score made an item's l NaN
    for (int i = 0; i < t.n_items; ++i) {
      const float* st = a.partial + static_cast<size_t>(t.first_item + i) * state;
      M = fmaxf(M, st[g]);
      poisoned = poisoned || st[G + g] != st[G + g];
    }
    float L = 0.f, o = 0.f;
    if (poisoned) {
      o = __int_as_float(0x7fc00000);  // NaN
    } else if (M == kNegInf) {  // no live key or only -inf scores: the zero-weighted sum
      for (int i = 0; i < t.n_items; ++i) o += a.partial[static_cast<size_t>(t.first_item + i) * state + 2 * G + e];
    } else {
      for (int i = 0; i < t.n_items; ++i) {
        const float* st = a.partial + static_cast<size_t>(t.first_item + i) * state;
        const float w = st[g] == kNegInf ? 0.f : exp2f(st[g] - M);
        L += st[G + g] * w;
        o += st[2 * G + e] * w;
      }
      o /= L;
    }
    store_from_f32(a.out, a.out_type, static_cast<size_t>(t.b * a.os0 + (t.h * G + g) * a.os1 + d * a.os2), o);
  }
}

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

}  // namespace

namespace detail {

const device_ops* cuda_ops() {
  static const cuda_device_ops ops;
  return &ops;
}

void cuda_decode(const tensor_view& q, const tensor_view& out, int64_t Hkv, dtype kv_type,
                 const std::vector<kv_chunk>& chunks, const std::vector<head_task>& tasks, int n_seg,
                 const std::vector<int64_t>& deltas, float scale, const rope_spec& rope) {
  const int D = static_cast<int>(q.shape[2]);
  const int G = static_cast<int>(q.shape[1] / Hkv);
  if (G * D > 8192) fail_value("CUDA decode attention supports query groups x head_dim up to 8192, got " +
                               std::to_string(G) + " x " + std::to_string(D));
  device_scope ds(q.device_id);
  const cudaStream_t s = stream();
  // chunks and their live masks
  std::vector<dchunk> dc(chunks.size());
  std::vector<uint8_t> masks;
  int max_n = 1;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const kv_chunk& c = chunks[i];
    dc[i] = {c.k, c.v, c.k_stride, c.v_stride, -1, c.n, c.seg, 0};
    if (c.live) {
      dc[i].live_off = static_cast<int32_t>(masks.size());
      masks.insert(masks.end(), c.live, c.live + c.n);
    }
    max_n = std::max(max_n, static_cast<int>(c.n));
  }
  // split long heads into items so every SM has work; merge afterwards
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int64_t want_items = std::max<int64_t>(n_tasks, 4 * sm_count(q.device_id));
  std::vector<ditem> items;
  std::vector<dtask> dt(tasks.size());
  for (int64_t ti = 0; ti < n_tasks; ++ti) {
    const head_task& t = tasks[ti];
    const int64_t nc = t.c1 - t.c0;
    int64_t splits = (want_items + n_tasks - 1) / n_tasks;
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, nc / 4));
    dt[ti] = {t.b, t.h, static_cast<int32_t>(items.size()), static_cast<int32_t>(splits)};
    for (int64_t sp = 0; sp < splits; ++sp)
      items.push_back({static_cast<int32_t>(ti), static_cast<int32_t>(t.c0 + nc * sp / splits),
                       static_cast<int32_t>(t.c0 + nc * (sp + 1) / splits), 0});
  }
  if (items.empty()) return;
  std::vector<float> inv(rope.inv_freq, rope.inv_freq + rope.n_freq);
  decode_args a{};
  a.q = q.data;
  a.qs0 = q.strides[0];
  a.qs1 = q.strides[1];
  a.qs2 = q.strides[2];
  a.q_type = q.type;
  a.kv_type = kv_type;
  a.out = out.data;
  a.os0 = out.strides[0];
  a.os1 = out.strides[1];
  a.os2 = out.strides[2];
  a.out_type = out.type;
  a.chunks = upload_vec(dc, q.device_id, s);
  a.items = upload_vec(items, q.device_id, s);
  a.tasks = upload_vec(dt, q.device_id, s);
  a.masks = masks.empty() ? nullptr : upload_vec(masks, q.device_id, s);
  a.deltas = deltas.empty() ? nullptr : upload_vec(deltas, q.device_id, s);
  a.n_seg = n_seg;
  a.inv_freq = inv.empty() ? nullptr : upload_vec(inv, q.device_id, s);
  a.n_freq = rope.n_freq;
  a.G = G;
  a.D = D;
  a.max_n = max_n;
  a.qscale = (scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(D))) * 1.4426950408889634f;
  float* partial = nullptr;
  KV_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&partial), items.size() * static_cast<size_t>(G * (D + 2)) * sizeof(float), s));
  a.partial = partial;
  const size_t shared = sizeof(float) * (static_cast<size_t>(3 * G * D) + 3 * G + static_cast<size_t>(G) * max_n);
  if (shared > 48 * 1024)
    KV_CUDA(cudaFuncSetAttribute(decode_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  KVLOOM_LAUNCH(decode_split_kernel, static_cast<unsigned>(items.size()), 128, shared, s)(a);
  KV_CUDA(cudaGetLastError());
  KVLOOM_LAUNCH(decode_merge_kernel, static_cast<unsigned>(dt.size()), 128, 0, s)(a);
  KV_CUDA(cudaGetLastError());
  for (const void* p : {static_cast<const void*>(a.chunks), static_cast<const void*>(a.items),
                        static_cast<const void*>(a.tasks), static_cast<const void*>(a.masks),
                        static_cast<const void*>(a.deltas), static_cast<const void*>(a.inv_freq),
                        static_cast<const void*>(partial)})
    release(const_cast<void*>(p), s);
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
