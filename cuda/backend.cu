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
#include <utility>
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
    KV_CUDA(malloc_async(&dev, std::max<size_t>(bytes, 16), s));
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

  // Waits for the copies in flight and frees the slots (a later upload allocates them again).
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ready_) return;
    for (int i = 0; i < kSlots; ++i) {
      KV_CUDA(cudaEventSynchronize(events_[i]));
      KV_CUDA(cudaEventDestroy(events_[i]));
      KV_CUDA(cudaFreeHost(host_[i]));
      host_[i] = nullptr;
      events_[i] = nullptr;
    }
    ready_ = false;
    next_ = 0;
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

std::mutex g_rings_mu;
std::vector<staging_ring*>* g_rings = new std::vector<staging_ring*>();  // one per device, never deleted

staging_ring& ring_for(int device) {
  std::lock_guard<std::mutex> lock(g_rings_mu);
  if (static_cast<int>(g_rings->size()) <= device) g_rings->resize(static_cast<size_t>(device) + 1, nullptr);
  if (!(*g_rings)[device]) (*g_rings)[device] = new staging_ring();
  return *(*g_rings)[device];
}

std::mutex g_pinned_mu;
auto* g_pinned_free = new std::vector<std::pair<size_t, void*>>();  // (capacity, buffer), never deleted

std::mutex g_pools_mu;
cudaMemPool_t g_pools[64] = {};  // per device, created on first use, never destroyed

cudaMemPool_t pool_for(int device) {
  if (device < 0 || device >= 64) fail(cudaErrorInvalidDevice, "kvloom's memory pool");
  std::lock_guard<std::mutex> lock(g_pools_mu);
  if (!g_pools[device]) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    KV_CUDA(cudaMemPoolCreate(&pool, &props));
    uint64_t keep_all = ~uint64_t(0);
    KV_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all));
    g_pools[device] = pool;
  }
  return g_pools[device];
}

}  // namespace

cudaError_t malloc_async(void** p, size_t bytes, cudaStream_t s) {
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  return cudaMallocFromPoolAsync(p, bytes, pool_for(device), s);
}

void* take_pinned(size_t bytes, size_t* cap) {
  {
    std::lock_guard<std::mutex> lock(g_pinned_mu);
    for (size_t i = 0; i < g_pinned_free->size(); ++i)
      if ((*g_pinned_free)[i].first >= bytes) {
        const auto got = (*g_pinned_free)[i];
        (*g_pinned_free)[i] = g_pinned_free->back();
        g_pinned_free->pop_back();
        *cap = got.first;
        return got.second;
      }
  }
  const size_t n = std::max<size_t>(bytes, size_t(64) << 10);
  void* p = nullptr;
  KV_CUDA(cudaHostAlloc(&p, n, cudaHostAllocDefault));
  *cap = n;
  return p;
}

void give_pinned(void* p, size_t cap) {
  if (!p) return;
  std::lock_guard<std::mutex> lock(g_pinned_mu);
  g_pinned_free->push_back({cap, p});
}

void release_cached_memory() {
  {
    std::lock_guard<std::mutex> lock(g_pinned_mu);
    for (const auto& b : *g_pinned_free) KV_CUDA(cudaFreeHost(b.second));
    g_pinned_free->clear();
  }
  {
    std::lock_guard<std::mutex> lock(g_rings_mu);
    for (size_t d = 0; d < g_rings->size(); ++d)
      if ((*g_rings)[d]) {
        device_scope ds(static_cast<int>(d));
        (*g_rings)[d]->release();
      }
  }
  std::lock_guard<std::mutex> lock(g_pools_mu);
  for (int d = 0; d < 64; ++d)
    if (g_pools[d]) {
      device_scope ds(d);
      KV_CUDA(cudaDeviceSynchronize());  // frees queued on any stream have run
      KV_CUDA(cudaMemPoolTrimTo(g_pools[d], 0));
    }
}

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
using detail::cu::malloc_async;
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
    KV_CUDA(malloc_async(&scratch, bytes, s));
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
  int64_t tile0;  // first row tile of this launch (gridDim.y is at most 65535)
  int G, D;
  float qscale;  // scale * log2(e)
  const detail::stat_head* heads;
  const detail::stat_key* keys;
  int64_t local_window;
  float* acc;    // [total keys]
  float* near;   // [total keys], or null: no window sums
  double* rows;  // [n_heads] query rows counted (with near)
};

constexpr int kStatThreads = 128;

// Grid (heads, tiles of QR query rows): a block takes QR query rows of one kv head (row r of
// the head is token r / G, query head h * G + r % G) and streams that head's visible keys
// through shared memory KT at a time: pass 1 finds each row's softmax max and sum, pass 2
// recomputes the scores and adds each key's probability, summed over the tile's rows (with
// `near`, also summed over the rows within local_window after the key, and the rows counted). QR x D and KT x D are at most 4096 floats;
// each thread computes the scores of one key for QR * KT / 128 rows (the key's elements are
// read once from shared memory for all of them; key rows are padded to D + 1 floats so the 32
// keys a warp reads are in 32 different banks).
template <int QR, int KT>
__global__ void __launch_bounds__(kStatThreads) prompt_stats_kernel(stats_args a) {
  constexpr int TPR = kStatThreads / QR;                          // threads per row (pass 1)
  constexpr int NE = QR * KT >= kStatThreads ? QR * KT / kStatThreads : 1;  // scores per thread
  constexpr int RSTEP = kStatThreads / KT;                        // rows between a thread's scores
  __shared__ float qs[QR * (4096 / QR)];
  __shared__ float ks[KT * (4096 / KT + 1)];
  __shared__ float sc[QR * KT];
  __shared__ float row_m[QR], row_inv[QR];
  __shared__ int64_t row_ord[QR];  // the row's token ord; -1: a padding row (sees no key)
  __shared__ int32_t key_ord[KT];
  __shared__ const void* key_ptr[KT];
  const int tid = threadIdx.x;
  const int D = a.D, DP = D + 1;
  const detail::stat_head hd = a.heads[blockIdx.x];
  const detail::stat_key* keys = a.keys + hd.first_key;
  const int64_t n_rows = a.Tq * a.G;
  const int64_t row0 = (a.tile0 + blockIdx.y) * QR;
  if (row0 >= n_rows || hd.n_keys == 0) return;  // (uniform over the block)

  // the tile's query rows, scaled, and their ords
  for (int i = tid; i < QR * D; i += kStatThreads) {
    const int r = i / D, d = i % D;
    const int64_t rr = row0 + r;
    float x = 0.f;
    if (rr < n_rows) {
      const int64_t t = rr / a.G, g = rr % a.G;
      x = load_as_f32(a.q, a.q_type, static_cast<size_t>(hd.b * a.qs0 + (hd.h * a.G + g) * a.qs1 + t * a.qs2 + d * a.qs3)) *
          a.qscale;
    }
    qs[r * D + d] = x;
  }
  for (int r = tid; r < QR; r += kStatThreads) {
    const int64_t rr = row0 + r;
    row_ord[r] = rr < n_rows ? hd.appended - a.Tq + rr / a.G : -1;
  }
  // keys visible to the tile's last row (keys are in ord order; every thread finds the same)
  const int64_t last = (row0 + QR < n_rows ? row0 + QR : n_rows) - 1;
  const int64_t last_ord = hd.appended - a.Tq + last / a.G;
  int64_t lo = 0, hi = hd.n_keys;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid].ord <= last_ord) lo = mid + 1;
    else hi = mid;
  }
  const int64_t n_vis = lo;
  if (n_vis == 0) return;  // (uniform)
  const int c = tid % KT, r_first = tid / KT;

  // keys [k0, k0 + nk) into shared memory
  auto load_keys = [&](int64_t k0, int nk) {
    __syncthreads();  // the previous tile's readers are done
    for (int kc = tid; kc < nk; kc += kStatThreads) {
      key_ptr[kc] = keys[k0 + kc].k;
      key_ord[kc] = keys[k0 + kc].ord;
    }
    __syncthreads();
    for (int i = tid; i < nk * D; i += kStatThreads) {
      const int kc = i / D, d = i % D;
      ks[kc * DP + d] = load_as_f32(key_ptr[kc], a.kv_type, static_cast<size_t>(d));
    }
    __syncthreads();
  };
  // this thread's scores (rows r_first + i * RSTEP, key c), -inf where the key is not visible
  auto scores = [&](int nk, float (&s)[NE]) {
    KVLOOM_UNROLL for (int i = 0; i < NE; ++i) s[i] = 0.f;
    if (r_first >= QR || c >= nk) return;
    for (int d = 0; d < D; ++d) {
      const float kd = ks[c * DP + d];
      KVLOOM_UNROLL for (int i = 0; i < NE; ++i) s[i] = fmaf(qs[(r_first + i * RSTEP) * D + d], kd, s[i]);
    }
    KVLOOM_UNROLL for (int i = 0; i < NE; ++i)
      if (key_ord[c] > row_ord[r_first + i * RSTEP]) s[i] = kNegInf;
  };

  // pass 1: each row's max and sum, TPR threads per row
  const int my_row = tid / TPR, sub = tid % TPR;
  float m = kNegInf, l = 0.f;
  for (int64_t k0 = 0; k0 < n_vis; k0 += KT) {
    const int nk = static_cast<int>(n_vis - k0 < KT ? n_vis - k0 : KT);
    load_keys(k0, nk);
    float s[NE];
    scores(nk, s);
    if (r_first < QR && c < nk)
      KVLOOM_UNROLL for (int i = 0; i < NE; ++i) sc[(r_first + i * RSTEP) * KT + c] = s[i];
    __syncthreads();
    for (int kc = sub; kc < nk; kc += TPR) {
      if (key_ord[kc] > row_ord[my_row]) continue;  // (not visible: nothing to add)
      const float x = sc[my_row * KT + kc];
      if (x > m) {
        l = (m == kNegInf ? 0.f : l * exp2f(m - x)) + 1.f;
        m = x;
      } else {
        l += exp2f(x - m);
      }
    }
  }
  KVLOOM_UNROLL for (int off = TPR / 2; off >= 1; off >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off), lo2 = __shfl_xor_sync(0xffffffffu, l, off);
    const float mx = fmaxf(m, mo);
    l = (m == kNegInf ? 0.f : l * exp2f(m - mx)) + (mo == kNegInf ? 0.f : lo2 * exp2f(mo - mx));
    m = mx;
  }
  // a row counts once it sees a key (keys are in ord order: the first is the earliest)
  const bool my_row_sees = row_ord[my_row] >= keys[0].ord;
  if (sub == 0) {
    row_m[my_row] = m;
    row_inv[my_row] = my_row_sees ? 1.f / l : 0.f;
  }

  // pass 2: probabilities, summed per key over the tile's rows
  for (int64_t k0 = 0; k0 < n_vis; k0 += KT) {
    const int nk = static_cast<int>(n_vis - k0 < KT ? n_vis - k0 : KT);
    load_keys(k0, nk);  // (its barrier also publishes row_m and row_inv)
    float s[NE];
    scores(nk, s);
    if (r_first < QR && c < nk) {
      KVLOOM_UNROLL for (int i = 0; i < NE; ++i) {
        const int r = r_first + i * RSTEP;
        const float inv = row_inv[r];
        sc[r * KT + c] = inv == 0.f || key_ord[c] > row_ord[r] ? 0.f : exp2f(s[i] - row_m[r]) * inv;
      }
    }
    __syncthreads();
    for (int kc = tid; kc < nk; kc += kStatThreads) {
      float sum = 0.f, near = 0.f;
      for (int r = 0; r < QR; ++r) {
        const float x = sc[r * KT + kc];
        sum += x;
        if (a.near && row_ord[r] - key_ord[kc] < a.local_window) near += x;
      }
      if (sum != 0.f) atomicAdd(a.acc + hd.first_key + k0 + kc, sum);
      if (near != 0.f) atomicAdd(a.near + hd.first_key + k0 + kc, near);
    }
  }
  if (a.near && tid == 0) {
    int counted = 0;
    for (int r = 0; r < QR; ++r) counted += row_ord[r] >= keys[0].ord ? 1 : 0;
    atomicAdd(a.rows + blockIdx.x, static_cast<double>(counted));
  }
}

// The (QR, KT) instance for head_dim D (QR x D and KT x D at most 4096 floats).
template <int QR, int KT>
void launch_stats(stats_args a, int64_t n_heads, cudaStream_t s) {
  const int64_t tiles = (a.Tq * a.G + QR - 1) / QR;
  for (int64_t t0 = 0; t0 < tiles; t0 += 65535) {
    a.tile0 = t0;
    const dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(std::min<int64_t>(65535, tiles - t0)));
    void (*k)(stats_args) = prompt_stats_kernel<QR, KT>;
    KVLOOM_LAUNCH(k, grid, kStatThreads, 0, s)(a);
    KV_CUDA(cudaGetLastError());
  }
}

}  // namespace

namespace detail {

const device_ops* cuda_ops() {
  static const cuda_device_ops ops;
  return &ops;
}

void cuda_prompt_stats(const tensor_view& q, int64_t G, dtype kv_type, int64_t D, const std::vector<stat_head>& heads,
                       const std::vector<stat_key>& keys, float scale, int64_t local_window, float* out_acc,
                       float* out_near, double* out_rows) {
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
  a.local_window = local_window;
  const size_t acc_bytes = std::max<size_t>(keys.size(), 1) * sizeof(float);
  const size_t rows_bytes = heads.size() * sizeof(double);
  KV_CUDA(malloc_async(reinterpret_cast<void**>(&a.acc), acc_bytes, s));
  KV_CUDA(cudaMemsetAsync(a.acc, 0, acc_bytes, s));
  if (out_near) {
    KV_CUDA(malloc_async(reinterpret_cast<void**>(&a.near), acc_bytes, s));
    KV_CUDA(malloc_async(reinterpret_cast<void**>(&a.rows), rows_bytes, s));
    KV_CUDA(cudaMemsetAsync(a.near, 0, acc_bytes, s));
    KV_CUDA(cudaMemsetAsync(a.rows, 0, rows_bytes, s));
  }
  if (D <= 64) launch_stats<64, 32>(a, static_cast<int64_t>(heads.size()), s);
  else if (D <= 128) launch_stats<32, 32>(a, static_cast<int64_t>(heads.size()), s);
  else if (D <= 256) launch_stats<16, 16>(a, static_cast<int64_t>(heads.size()), s);
  else launch_stats<8, 8>(a, static_cast<int64_t>(heads.size()), s);
  if (!keys.empty()) {
    KV_CUDA(cudaMemcpyAsync(out_acc, a.acc, keys.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
    if (out_near) KV_CUDA(cudaMemcpyAsync(out_near, a.near, keys.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
  }
  if (out_near) KV_CUDA(cudaMemcpyAsync(out_rows, a.rows, rows_bytes, cudaMemcpyDeviceToHost, s));
  for (const void* p : {static_cast<const void*>(a.heads), static_cast<const void*>(a.keys),
                        static_cast<const void*>(a.acc), static_cast<const void*>(a.near),
                        static_cast<const void*>(a.rows)})
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

void cuda_release_cached_memory() { detail::cu::release_cached_memory(); }

}  // namespace kvloom
