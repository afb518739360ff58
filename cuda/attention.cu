// CUDA attention: decode steps and prompt chunks over a CUDA cache's head stores, and decode
// attention over dense [B, Hkv, T, D] tensors. One kernel serves all three.
//
// The cache's block tables reach the GPU as device mirrors (device_mirror.h): per head store,
//   blocks [cap]       key address of each table entry's block (0: no block, or nothing live;
//                      bit 0 set: a quantized cache's sealed block, in kvloom/quant.h's layout)
//   ords   [cap * bs]  each slot's token index (ord), -1 where the slot is not live
// Before a call, the entries the cache touched since the last upload are gathered into one
// patch list, uploaded with the call's descriptors in a single copy and scattered by a kernel,
// so a decode step uploads a few bytes per head instead of its table. The host never waits for
// the GPU on this path.
//
// Work decomposition: a task is (row b, kv head h, tile of GT query rows); query row r of
// (b, h) is token t = r / G of the chunk and query head h * G + r % G (decode: Tq = 1). A task's
// keys are the rows of its segments (the view's sequences; one per dense tensor); each segment
// is split into items of about the same number of rows, one thread block each (split-K). In a
// block, L lanes share one key row (each holds E of its D elements: 16-byte loads, coalesced
// across the warp), so a warp reads 32 / L consecutive rows at a time; each lane group keeps
// its own online-softmax state for the GT query rows in registers. Groups merge by warp
// shuffles, warps through shared memory, items in the merge kernel. Scores are in the log2
// domain (queries pre-scaled by scale * log2 e), as on the CPU; non-finite inputs follow the
// CPU kernels (kernels.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "cuda_backend.h"
#include "cuda_common.h"
#include "deferred.h"
#include "head_store.h"

namespace kvloom {
namespace detail {

// ---- device mirrors of the head stores' tables ----------------------------------------------
struct mirror_state {
  int device = 0;
  int64_t cap = 0;             // table entries the arrays hold
  uint64_t* blocks = nullptr;  // [cap]
  int32_t* ords = nullptr;     // [cap * block_size]
};

void mirror_release(mirror_state* m) {
  if (!m) return;
  int prev = -1;
  if (cudaGetDevice(&prev) == cudaSuccess) {  // errors are ignored: this runs in destructors, maybe at exit
    if (prev != m->device) cudaSetDevice(m->device);
    cudaFreeAsync(m->blocks, cu::stream());
    cudaFreeAsync(m->ords, cu::stream());
    if (prev != m->device) cudaSetDevice(prev);
  }
  cudaGetLastError();
  delete m;
}

namespace {

using cu::device_scope;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kThreads = 128;  // threads per attention block: 4 warps
constexpr int kWarps = kThreads / 32;

// Whether every mirror is read back and compared with the host metadata after each upload:
// always in the simulated build (the tests), on a GPU with KVLOOM_VERIFY_DEVICE_TABLES=1.
bool verify_mirrors() {
#ifdef KVLOOM_CUDA_SIM
  return true;
#else
  static const bool on = [] {
    const char* e = std::getenv("KVLOOM_VERIFY_DEVICE_TABLES");
    return e && std::strcmp(e, "0") != 0;
  }();
  return on;
#endif
}

// One run of 4-byte words to copy from the call's payload into a mirror.
struct patch {
  uint64_t dst;    // device address
  uint64_t src;    // byte offset in the payload
  uint64_t words;
};

// The mirror contents of table entries [lo, hi) of a store, as uploaded. A sealed entry's
// address is its quantized block's (in `qpool`) with bit 0 set (blocks are 64-byte aligned).
void mirror_rows(const head_store& hs, const block_pool& pool, const block_pool* qpool, int64_t lo, int64_t hi,
                 std::vector<uint64_t>& blocks, std::vector<int32_t>& ords) {
  const int bs = pool.block_size();
  blocks.resize(static_cast<size_t>(hi - lo));
  ords.resize(static_cast<size_t>((hi - lo) * bs));
  for (int64_t e = lo; e < hi; ++e) {
    const block_id b = hs.table_[e];
    const bool sealed = b >= 0 && hs.sealed(e);
    blocks[e - lo] = b < 0 || hs.block_live_[e] == 0 ? 0
                     : sealed                       ? reinterpret_cast<uint64_t>(qpool->block_keys(b)) | 1u
                                                    : reinterpret_cast<uint64_t>(pool.block_keys(b));
    for (int r = 0; r < bs; ++r) {
      const int64_t slot = e * bs + r;
      ords[(e - lo) * bs + r] = hs.live_[slot] ? hs.ord_[slot] : -1;
    }
  }
}

std::atomic<int64_t> g_table_words{0};  // 4-byte words of table mirrors uploaded (cuda_table_upload_words)

// Collects one call's mirror updates: sync() makes each store's mirror current (growing it
// when its table outgrew it) and records the patches; commit() marks the stores clean once
// the patches are queued.
class mirror_sync {
 public:
  mirror_sync(const block_pool& pool, const block_pool* qpool, int device, cudaStream_t s)
      : pool_(pool), qpool_(qpool), device_(device), s_(s) {}

  const mirror_state* sync(const head_store& hs) {
    const int bs = pool_.block_size();
    const int64_t n = static_cast<int64_t>(hs.table_.size());
    mirror_state* m = hs.mirror_.get();
    // the dirty ranges within the table, sorted and merged
    std::vector<head_store::entry_range> ranges;
    for (int i = 0; i < hs.n_dirty_; ++i) {
      const int64_t lo = std::max<int64_t>(0, hs.dirty_[i].lo), hi = std::min(hs.dirty_[i].hi, n);
      if (lo < hi) ranges.push_back({lo, hi});
    }
    std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) { return a.lo < b.lo; });
    size_t kept = 0;
    for (const auto& r : ranges) {
      if (kept > 0 && r.lo <= ranges[kept - 1].hi) ranges[kept - 1].hi = std::max(ranges[kept - 1].hi, r.hi);
      else ranges[kept++] = r;
    }
    ranges.resize(kept);
    if (!m || m->cap < n) {
      auto fresh = new mirror_state();
      fresh->device = device_;
      fresh->cap = std::max<int64_t>({16, n, m ? 2 * m->cap : 0});
      if (cu::malloc_async(reinterpret_cast<void**>(&fresh->blocks), static_cast<size_t>(fresh->cap) * 8, s_) != cudaSuccess ||
          cu::malloc_async(reinterpret_cast<void**>(&fresh->ords), static_cast<size_t>(fresh->cap) * bs * 4, s_) != cudaSuccess) {
        cudaGetLastError();
        mirror_release(fresh);
        throw capacity_error("CUDA device memory exhausted while uploading a block table");
      }
      hs.mirror_.set(fresh);  // frees the old arrays (stream-ordered)
      hs.touch_all();         // until the upload below is committed, the new arrays hold nothing
      m = fresh;
      ranges.assign(1, {0, n});
      if (n == 0) ranges.clear();
    }
    for (const auto& r : ranges) {
      mirror_rows(hs, pool_, qpool_, r.lo, r.hi, blocks_, ords_);
      add(m->blocks + r.lo, blocks_.data(), blocks_.size() * 8);
      add(m->ords + r.lo * bs, ords_.data(), ords_.size() * 4);
    }
    synced_.push_back(&hs);
    return m;
  }

  bool empty() const { return patches_.empty(); }
  const std::vector<patch>& patches() const { return patches_; }
  const std::vector<uint32_t>& payload() const { return payload_; }

  void commit() {
    for (const head_store* hs : synced_) hs->n_dirty_ = 0;
  }

  // Reads every synced mirror back and compares it with the host metadata (verify_mirrors()).
  void verify() const {
    KV_CUDA(cudaStreamSynchronize(s_));
    std::vector<uint64_t> want_b, got_b;
    std::vector<int32_t> want_o, got_o;
    for (const head_store* hs : synced_) {
      const int64_t n = static_cast<int64_t>(hs->table_.size());
      if (n == 0) continue;
      mirror_rows(*hs, pool_, qpool_, 0, n, want_b, want_o);
      got_b.resize(want_b.size());
      got_o.resize(want_o.size());
      const mirror_state* m = hs->mirror_.get();
      KV_CUDA(cudaMemcpy(got_b.data(), m->blocks, got_b.size() * 8, cudaMemcpyDeviceToHost));
      KV_CUDA(cudaMemcpy(got_o.data(), m->ords, got_o.size() * 4, cudaMemcpyDeviceToHost));
      if (got_b != want_b || got_o != want_o)
        throw std::logic_error("kvloom internal error: a device block table is out of date (a change to a head store "
                               "was not marked with touch())");
    }
  }

 private:
  void add(void* dst, const void* src, size_t bytes) {
    g_table_words.fetch_add(static_cast<int64_t>(bytes / 4), std::memory_order_relaxed);
    patches_.push_back({reinterpret_cast<uint64_t>(dst), payload_.size() * 4, bytes / 4});
    const auto* w = static_cast<const uint32_t*>(src);
    payload_.insert(payload_.end(), w, w + bytes / 4);
  }
  const block_pool& pool_;
  const block_pool* qpool_;  // a quantized cache's sealed blocks (null: none)
  int device_;
  cudaStream_t s_;
  std::vector<patch> patches_;
  std::vector<uint32_t> payload_;
  std::vector<const head_store*> synced_;
  std::vector<uint64_t> blocks_;
  std::vector<int32_t> ords_;
};

std::mutex g_mirror_mu;  // mirrors and dirty ranges are read and written under it

__global__ void apply_patches_kernel(const patch* patches, const uint32_t* payload) {
  const patch p = patches[blockIdx.x];
  uint32_t* dst = reinterpret_cast<uint32_t*>(p.dst);
  const uint32_t* src = payload + p.src / 4;
  for (uint64_t i = threadIdx.x; i < p.words; i += blockDim.x) dst[i] = src[i];
}

// ---- the attention kernel -------------------------------------------------------------------
// Where the keys of one (row, kv head, segment) live.
struct seg_desc {
  const uint64_t* blocks;  // paged: [n_rows / bs] key addresses of the blocks; null: a dense segment
  const int32_t* ords;     // paged: [n_rows] ord of each slot, -1: not live
  const char* k;           // dense: key row 0
  const char* v;           // dense: value row 0
  int64_t k_stride, v_stride;  // dense: bytes between rows
  int64_t n_rows;
  int64_t delta;     // angle offset of this segment's query rotation
  int64_t prob_off;  // accumulation: where its rows' probabilities start in attn_params::probs
};

struct item_desc {
  int32_t task, seg;
  int64_t r0, r1;  // rows [r0, r1) of the segment
};

struct task_desc {
  int32_t b, h, tile;
  int32_t first_item, n_items;
  int32_t pad_;
};

struct attn_params {
  const void* q;  // [B, Hq, Tq, D] (decode: Tq = 1)
  int64_t qs[4];  // strides, elements
  dtype q_type;
  void* out;  // [B, Hq, Tq, D]
  int64_t os[4];
  dtype out_type;
  int G, D, Tq, n_qrows;  // n_qrows = Tq * G
  float qscale;           // scale * log2(e)
  const seg_desc* segs;
  const item_desc* items;
  const task_desc* tasks;
  const float* inv_freq;  // [n_freq]
  int n_freq;
  int bs;                 // paged: tokens per block
  int64_t row_bytes;      // D * element size
  int64_t v_offset;       // paged: bytes from a block's keys to its values
  const int64_t* first_ord;  // chunks: [B] ord of each row's first query token; null: decode
  const void* mask;          // chunks: optional [B, Tq, K] (indexed by ord)
  int64_t ms0, ms1, ms2;
  dtype mask_type;
  float mask_threshold;
  float* partial;  // [n_items][GT][D + 2]: m[GT], l[GT], acc[GT][D]
  // Accumulation (decode with the policies' statistic): the merge writes each query row's final
  // max and 1 / sum to final_stats [n_tasks][GT][2]; a second launch of the attention kernel
  // with probs set adds each live row's probability, summed over the tile's query rows, to
  // probs[seg.prob_off + row] (and does nothing else).
  float* final_stats;
  float* probs;
  // A quantized cache (kernels with Q): sealed blocks (table address | 1) in kvloom/quant.h's
  // layout: bits per code, bytes per code row, the byte offsets of the key (min, step) pairs,
  // the value codes and the value (min, step) pairs, channels per value group.
  int q_bits, q_vgroup;
  int64_t q_row_bytes, q_kparams, q_vcodes, q_vparams;
};

struct f32_kv {
  using raw = float;
  static __device__ __forceinline__ float cvt(raw x) { return x; }
};
struct f16_kv {
  using raw = uint16_t;
  static __device__ __forceinline__ float cvt(raw x) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(x));
#else
    return f16_to_f32(x);
#endif
  }
};
struct bf16_kv {
  using raw = uint16_t;
  static __device__ __forceinline__ float cvt(raw x) { return bf16_to_f32(x); }
};

// E elements of a row, as loaded: 16-byte words (VEC) or already-converted floats.
template <class KV, int E, bool VEC>
struct row_chunk {
  static constexpr int kWords = VEC ? static_cast<int>(E * sizeof(typename KV::raw) / 16) : 1;
  uint4 w[kWords];
  float f[VEC ? 1 : E];
  __device__ __forceinline__ void clear() {
    if constexpr (VEC) {
      KVLOOM_UNROLL for (int i = 0; i < kWords; ++i) w[i] = uint4{0, 0, 0, 0};
    } else {
      KVLOOM_UNROLL for (int i = 0; i < E; ++i) f[i] = 0.f;
    }
  }
  // Elements [e0, e0 + E) of the row at `row` (those >= D read as 0 on the scalar path).
  __device__ __forceinline__ void load(const char* row, int e0, int D) {
    if constexpr (VEC) {
      const uint4* p = reinterpret_cast<const uint4*>(row + static_cast<size_t>(e0) * sizeof(typename KV::raw));
      KVLOOM_UNROLL for (int i = 0; i < kWords; ++i) w[i] = p[i];
    } else {
      const auto* p = reinterpret_cast<const typename KV::raw*>(row);
      KVLOOM_UNROLL for (int i = 0; i < E; ++i) f[i] = e0 + i < D ? KV::cvt(p[e0 + i]) : 0.f;
      (void)w;
    }
  }
  // Elements [e0, e0 + E) of row `row` of a quantized block (kvloom/quant.h): its keys or its
  // values, dequantized in registers as the host does, fma(code, step, min) (scalar path only).
  __device__ __forceinline__ void load_quant(const char* blk, int row, int e0, int D, const attn_params& p, bool values) {
    if constexpr (!VEC) {
      const auto* codes = reinterpret_cast<const uint8_t*>(blk + (values ? p.q_vcodes : 0) + row * p.q_row_bytes);
      const auto* prm = reinterpret_cast<const uint16_t*>(blk + (values ? p.q_vparams : p.q_kparams));
      const int groups = D / p.q_vgroup;
      const unsigned mask = (1u << p.q_bits) - 1u;
      KVLOOM_UNROLL for (int i = 0; i < E; ++i) {
        const int d = e0 + i;
        if (d >= D) {
          f[i] = 0.f;
          continue;
        }
        const int bit = d * p.q_bits;
        const float c = static_cast<float>((codes[bit >> 3] >> (bit & 7)) & mask);
        const int at = values ? (d / p.q_vgroup) * p.bs + row : d;
        const int n_min = values ? groups * p.bs : D;  // the steps follow the minimums
        f[i] = fmaf(c, f16_kv::cvt(prm[n_min + at]), f16_kv::cvt(prm[at]));
      }
    }
  }
  // 32-bit word i of the loaded bytes (i a compile-time constant once unrolled)
  __device__ __forceinline__ unsigned word(int i) const {
    const uint4& v = w[i / 4];
    return i % 4 == 0 ? v.x : i % 4 == 1 ? v.y : i % 4 == 2 ? v.z : v.w;
  }
  __device__ __forceinline__ void to_float(float (&x)[E]) const {
    if constexpr (VEC) {
      static_assert(E * sizeof(typename KV::raw) == kWords * 16, "a vector chunk is whole 16-byte words");
      KVLOOM_UNROLL for (int i = 0; i < E; ++i) {
        if constexpr (sizeof(typename KV::raw) == 4) {
          x[i] = __uint_as_float(word(i));
        } else {
          x[i] = KV::cvt(static_cast<uint16_t>(word(i / 2) >> (16 * (i % 2))));
        }
      }
    } else {
      KVLOOM_UNROLL for (int i = 0; i < E; ++i) x[i] = f[i];
    }
  }
};

__device__ __forceinline__ bool mask_allows(const attn_params& p, int b, int t, int32_t ord) {
  const size_t i = static_cast<size_t>(b * p.ms0 + t * p.ms1 + static_cast<int64_t>(ord) * p.ms2);
  if (p.mask_type == dtype::u8) return static_cast<const uint8_t*>(p.mask)[i] != 0;
  return load_as_f32(p.mask, p.mask_type, i) > p.mask_threshold;
}

// Two online-softmax states of one query row merged into (m, l, acc): with a finite max each
// side is weighted by exp2(its max - the max); with none, the zero-weighted sums add up.
__device__ __forceinline__ void merge_weights(float m1, float m2, float& M, float& w1, float& w2) {
  M = fmaxf(m1, m2);
  w1 = M == kNegInf ? 1.f : exp2f(m1 - M);
  w2 = M == kNegInf ? 1.f : exp2f(m2 - M);
}

// KV: storage type; L lanes per key row, E elements per lane (L * E >= D); VEC: 16-byte loads
// (rows 16-byte aligned, L * E == D); GT query rows per task; R rows per lane group per step;
// Q: a quantized cache, whose sealed blocks (table address | 1) are dequantized in registers.
template <class KV, int L, int E, bool VEC, int GT, int R, bool Q>
__global__ void __launch_bounds__(kThreads) attention_kernel(attn_params p) {
  constexpr int KPW = 32 / L;         // key rows a warp reads at once
  constexpr int W = kWarps * KPW;     // lane groups in the block
  constexpr unsigned kFull = 0xffffffffu;
  KVLOOM_DYNAMIC_SMEM(float, sm);     // [kWarps][GT][2 + L * E]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane / L, gl = lane % L;
  const int worker = warp * KPW + grp;
  const int e0 = gl * E;
  const int D = p.D;
  const item_desc it = p.items[blockIdx.x];
  const task_desc tk = p.tasks[it.task];
  const seg_desc sg = p.segs[it.seg];

  // this task's query rows, scaled and rotated for the segment
  float q[GT][E];
  int tq[GT];
  const int nf = sg.delta != 0 ? p.n_freq : 0;
  KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
    const int qr = tk.tile * GT + j;
    const bool real = qr < p.n_qrows;
    const int t = real ? qr / p.G : 0, g = real ? qr % p.G : 0;
    tq[j] = t;
    const int64_t base = tk.b * p.qs[0] + (static_cast<int64_t>(tk.h) * p.G + g) * p.qs[1] + t * p.qs[2];
    KVLOOM_UNROLL for (int e = 0; e < E; ++e) {
      const int d = e0 + e;
      float x = 0.f;
      if (real && d < D) {
        x = load_as_f32(p.q, p.q_type, static_cast<size_t>(base + d * p.qs[3])) * p.qscale;
        if (d < 2 * nf) {
          const int i = d < nf ? d : d - nf;
          const int partner = d < nf ? d + nf : d - nf;
          const float xp = load_as_f32(p.q, p.q_type, static_cast<size_t>(base + partner * p.qs[3])) * p.qscale;
          const double ang = static_cast<double>(sg.delta) * static_cast<double>(p.inv_freq[i]);
          const float cs = static_cast<float>(cos(ang)), sn = static_cast<float>(sin(ang));
          x = d < nf ? x * cs - xp * sn : x * cs + xp * sn;
        }
      }
      q[j][e] = x;
    }
  }
  float m[GT], l[GT], acc[GT][E];
  KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
    m[j] = kNegInf;
    l[j] = 0.f;
    KVLOOM_UNROLL for (int e = 0; e < E; ++e) acc[j][e] = 0.f;
  }
  const bool chunk = p.first_ord != nullptr;
  const int64_t first_ord = chunk ? p.first_ord[tk.b] : 0;

  // warp-uniform loop: the warp's first row of each step decides
  for (int64_t step0 = it.r0; step0 + warp * KPW < it.r1; step0 += static_cast<int64_t>(W) * R) {
    row_chunk<KV, E, VEC> kc[R], vc[R];
    bool live[R];
    int32_t ord[R];
    KVLOOM_UNROLL for (int i = 0; i < R; ++i) {
      const int64_t r = step0 + static_cast<int64_t>(i) * W + worker;
      const char* kp = nullptr;
      const char* vp = nullptr;
      const char* qb = nullptr;  // (Q) the sealed block holding the row
      live[i] = r < it.r1;
      ord[i] = 0;
      if (live[i]) {
        if (sg.blocks) {
          const uint64_t blk = sg.blocks[r / p.bs];
          ord[i] = sg.ords[r];
          live[i] = blk != 0 && ord[i] >= 0;
          if (Q && (blk & 1u)) qb = reinterpret_cast<const char*>(blk & ~uint64_t(1));
          kp = reinterpret_cast<const char*>(blk) + (r % p.bs) * p.row_bytes;
          vp = kp + p.v_offset;
        } else {
          kp = sg.k + r * sg.k_stride;
          vp = sg.v + r * sg.v_stride;
        }
      }
      if (live[i] && qb) {
        const int row = static_cast<int>(r % p.bs);
        kc[i].load_quant(qb, row, e0, D, p, false);
        if (!p.probs) vc[i].load_quant(qb, row, e0, D, p, true);
        else vc[i].clear();
      } else if (live[i]) {
        kc[i].load(kp, e0, D);
        if (!p.probs) vc[i].load(vp, e0, D);
        else vc[i].clear();
      } else {
        kc[i].clear();
        vc[i].clear();
      }
    }
    float s[R][GT];
    KVLOOM_UNROLL for (int i = 0; i < R; ++i) {
      float kf[E];
      kc[i].to_float(kf);
      KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
        float dot = 0.f;
        KVLOOM_UNROLL for (int e = 0; e < E; ++e) dot = fmaf(q[j][e], kf[e], dot);
        s[i][j] = dot;
      }
    }
    KVLOOM_UNROLL for (int off = L / 2; off >= 1; off >>= 1)
      KVLOOM_UNROLL for (int i = 0; i < R; ++i)
        KVLOOM_UNROLL for (int j = 0; j < GT; ++j) s[i][j] += __shfl_xor_sync(kFull, s[i][j], off);
    if (p.probs) {  // the probabilities pass: final max and sum known, nothing accumulates
      if (gl == 0) {
        const float* fs = p.final_stats + static_cast<size_t>(it.task) * GT * 2;
        KVLOOM_UNROLL for (int i = 0; i < R; ++i) {
          if (!live[i]) continue;
          float add = 0.f;
          KVLOOM_UNROLL for (int j = 0; j < GT; ++j)
            if (fs[2 * j + 1] != 0.f) add += exp2f(s[i][j] - fs[2 * j]) * fs[2 * j + 1];
          atomicAdd(p.probs + sg.prob_off + step0 + static_cast<int64_t>(i) * W + worker, add);
        }
      }
      continue;
    }
    float vf[R][E];
    KVLOOM_UNROLL for (int i = 0; i < R; ++i) vc[i].to_float(vf[i]);
    KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
      bool vis[R];
      float mx = kNegInf;
      KVLOOM_UNROLL for (int i = 0; i < R; ++i) {
        vis[i] = live[i] && (!chunk || (ord[i] <= first_ord + tq[j] && (!p.mask || mask_allows(p, tk.b, tq[j], ord[i]))));
        if (vis[i]) mx = fmaxf(mx, s[i][j]);
      }
      const float mn = fmaxf(m[j], mx);
      const float corr = m[j] == kNegInf ? (mn == kNegInf ? 1.f : 0.f) : exp2f(m[j] - mn);
      float pr[R];
      float lsum = 0.f;
      KVLOOM_UNROLL for (int i = 0; i < R; ++i) {
        pr[i] = !vis[i] || s[i][j] == kNegInf ? 0.f : exp2f(s[i][j] - mn);
        lsum += pr[i];
      }
      l[j] = l[j] * corr + lsum;
      m[j] = mn;
      KVLOOM_UNROLL for (int e = 0; e < E; ++e) {
        float a = acc[j][e] * corr;
        KVLOOM_UNROLL for (int i = 0; i < R; ++i)
          if (vis[i]) a = fmaf(pr[i], vf[i][e], a);
        acc[j][e] = a;
      }
    }
  }

  if (p.probs) return;  // (the whole block: p is uniform)
  // merge the warp's lane groups (the xor partners hold the same elements of another group)
  KVLOOM_UNROLL for (int off = L; off < 32; off <<= 1)
    KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
      const float mo = __shfl_xor_sync(kFull, m[j], off), lo = __shfl_xor_sync(kFull, l[j], off);
      float M, w1, w2;
      merge_weights(m[j], mo, M, w1, w2);
      l[j] = l[j] * w1 + lo * w2;
      KVLOOM_UNROLL for (int e = 0; e < E; ++e) {
        const float ao = __shfl_xor_sync(kFull, acc[j][e], off);
        acc[j][e] = acc[j][e] * w1 + ao * w2;
      }
      m[j] = M;
    }
  // then the warps, through shared memory
  constexpr int kRow = 2 + L * E;
  if (grp == 0) {
    float* st = sm + warp * GT * kRow;
    KVLOOM_UNROLL for (int j = 0; j < GT; ++j) {
      if (gl == 0) {
        st[j * kRow] = m[j];
        st[j * kRow + 1] = l[j];
      }
      KVLOOM_UNROLL for (int e = 0; e < E; ++e) st[j * kRow + 2 + e0 + e] = acc[j][e];
    }
  }
  __syncthreads();
  float* out = p.partial + static_cast<size_t>(blockIdx.x) * GT * (D + 2);
  for (int idx = threadIdx.x; idx < GT * D; idx += kThreads) {
    const int j = idx / D, d = idx % D;
    float M = kNegInf;
    KVLOOM_UNROLL for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm[(w * GT + j) * kRow]);
    float a = 0.f, lj = 0.f;
    KVLOOM_UNROLL for (int w = 0; w < kWarps; ++w) {
      const float* st = sm + (w * GT + j) * kRow;
      const float wt = M == kNegInf ? 1.f : exp2f(st[0] - M);
      a += st[2 + d] * wt;
      lj += st[1] * wt;
    }
    out[2 * GT + j * D + d] = a;
    if (d == 0) {
      out[j] = M;
      out[GT + j] = lj;
    }
  }
}

// One block per task: merges its items and writes the output rows (zeros for a row that saw
// no key, the zero-weighted sum of values where every score was -inf, NaN after a NaN score).
template <int GT>
__global__ void merge_kernel(attn_params p) {
  const task_desc tk = p.tasks[blockIdx.x];
  const int D = p.D;
  for (int idx = threadIdx.x; idx < GT * D; idx += blockDim.x) {
    const int j = idx / D, d = idx % D;
    const int qr = tk.tile * GT + j;
    float* fs = p.final_stats ? p.final_stats + (static_cast<size_t>(blockIdx.x) * GT + j) * 2 : nullptr;
    if (fs && d == 0) {  // no weight at all (1 / sum = 0) unless a finite max and a finite sum
      fs[0] = kNegInf;
      fs[1] = 0.f;
    }
    if (qr >= p.n_qrows) continue;  // (a tile's padding row)
    float M = kNegInf;
    bool poisoned = false;
    for (int i = 0; i < tk.n_items; ++i) {
      const float* st = p.partial + static_cast<size_t>(tk.first_item + i) * GT * (D + 2);
      M = fmaxf(M, st[j]);
      poisoned = poisoned || st[GT + j] != st[GT + j];
    }
    float o = 0.f;
    if (fs && d == 0) fs[0] = M;
    if (poisoned) {
      o = __int_as_float(0x7fc00000);
    } else if (M == kNegInf) {
      for (int i = 0; i < tk.n_items; ++i) o += p.partial[static_cast<size_t>(tk.first_item + i) * GT * (D + 2) + 2 * GT + j * D + d];
    } else {
      float Lsum = 0.f;
      for (int i = 0; i < tk.n_items; ++i) {
        const float* st = p.partial + static_cast<size_t>(tk.first_item + i) * GT * (D + 2);
        const float w = exp2f(st[j] - M);
        Lsum += st[GT + j] * w;
        o += st[2 * GT + j * D + d] * w;
      }
      o /= Lsum;
      if (fs && d == 0) fs[1] = 1.f / Lsum;
    }
    const int t = qr / p.G, g = qr % p.G;
    const int64_t at = tk.b * p.os[0] + (static_cast<int64_t>(tk.h) * p.G + g) * p.os[1] + t * p.os[2] + d * p.os[3];
    store_from_f32(p.out, p.out_type, static_cast<size_t>(at), o);
  }
}

// ---- host side ---------------------------------------------------------------------------
struct kernel_shape {
  int L, E;
  bool vec;
};

// Lanes per row and elements per lane for head_dim D: 16-byte loads where the rows allow.
kernel_shape shape_for(dtype kv, int D, bool aligned) {
  const int esz = static_cast<int>(dtype_size(kv));
  if (aligned) {
    if (esz == 4) {
      if (D == 64) return {16, 4, true};
      if (D == 128) return {32, 4, true};
      if (D == 256) return {32, 8, true};
    } else {
      if (D == 64) return {8, 8, true};
      if (D == 128) return {16, 8, true};
      if (D == 256) return {32, 8, true};
    }
  }
  return {32, 8, false};  // any D <= 256, element by element
}

int tile_for(int n_qrows) { return n_qrows <= 1 ? 1 : n_qrows <= 4 ? 4 : 8; }

using kernel_fn = void (*)(attn_params);

template <class KV, int GT>
kernel_fn pick_shape(kernel_shape s, bool quant) {
  constexpr int R = GT >= 8 ? 2 : 4;
  if (quant) {  // element by element, 8 elements a lane, as few lanes per row as D allows
    if (s.L == 8) return attention_kernel<KV, 8, 8, false, GT, R, true>;
    if (s.L == 16) return attention_kernel<KV, 16, 8, false, GT, R, true>;
    return attention_kernel<KV, 32, 8, false, GT, R, true>;
  }
  if (s.vec) {
    if constexpr (sizeof(typename KV::raw) == 4) {
      if (s.L == 16) return attention_kernel<KV, 16, 4, true, GT, R, false>;  // D 64
      if (s.E == 4) return attention_kernel<KV, 32, 4, true, GT, R, false>;   // D 128
      return attention_kernel<KV, 32, 8, true, GT, R, false>;                 // D 256
    } else {
      if (s.L == 8) return attention_kernel<KV, 8, 8, true, GT, R, false>;    // D 64
      if (s.L == 16) return attention_kernel<KV, 16, 8, true, GT, R, false>;  // D 128
      return attention_kernel<KV, 32, 8, true, GT, R, false>;                 // D 256
    }
  }
  return attention_kernel<KV, 32, 8, false, GT, R, false>;
}

template <class KV>
kernel_fn pick_tile(int GT, kernel_shape s, bool quant) {
  if (GT == 1) return pick_shape<KV, 1>(s, quant);
  if (GT == 4) return pick_shape<KV, 4>(s, quant);
  return pick_shape<KV, 8>(s, quant);
}

kernel_fn pick_kernel(dtype kv, int GT, kernel_shape s, bool quant) {
  if (kv == dtype::f32) return pick_tile<f32_kv>(GT, s, quant);
  if (kv == dtype::f16) return pick_tile<f16_kv>(GT, s, quant);
  if (kv == dtype::bf16) return pick_tile<bf16_kv>(GT, s, quant);
  fail_type(std::string("attention over ") + dtype_name(kv) + " keys is not supported on CUDA");
}

kernel_fn pick_merge(int GT) {
  if (GT == 1) return merge_kernel<1>;
  if (GT == 4) return merge_kernel<4>;
  return merge_kernel<8>;
}

// Bytes appended to one upload, each part 16-byte aligned.
class upload_buffer {
 public:
  template <class T>
  size_t add(const std::vector<T>& v) {
    return add(v.data(), v.size() * sizeof(T));
  }
  size_t add(const void* p, size_t bytes) {
    const size_t at = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(at + bytes);
    if (bytes) std::memcpy(bytes_.data() + at, p, bytes);
    return at;
  }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  std::vector<char> bytes_;
};

// The call's work: tasks, their items and segments, and how to launch.
struct call_plan {
  std::vector<seg_desc> segs;
  std::vector<std::vector<int32_t>> segs_of;  // [B * Hkv]: the segments of (b, h), in view order
  std::vector<item_desc> items;
  std::vector<task_desc> tasks;
};

// Splits every task's segments into items of about equal rows, enough to fill the device.
void plan_items(call_plan& cp, int64_t B, int64_t Hkv, int n_tiles, int device) {
  int64_t total = 0;
  for (const auto& sg : cp.segs) total += sg.n_rows;
  total *= n_tiles;
  const int64_t n_tasks = B * Hkv * n_tiles;
  const int64_t want = std::max<int64_t>(n_tasks, 8 * static_cast<int64_t>(cu::sm_count(device)));
  const int64_t per_item = std::max<int64_t>(128, (total + want - 1) / want);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int tile = 0; tile < n_tiles; ++tile) {
        task_desc t{static_cast<int32_t>(b), static_cast<int32_t>(h), tile, static_cast<int32_t>(cp.items.size()), 0, 0};
        for (int32_t si : cp.segs_of[b * Hkv + h]) {
          const int64_t n = cp.segs[si].n_rows;
          const int64_t splits = (n + per_item - 1) / per_item;
          for (int64_t k = 0; k < splits; ++k)
            cp.items.push_back({static_cast<int32_t>(cp.tasks.size()), si, n * k / splits, n * (k + 1) / splits});
        }
        t.n_items = static_cast<int32_t>(cp.items.size()) - t.first_item;
        cp.tasks.push_back(t);
      }
}

struct call_extras {
  const float* inv_freq = nullptr;
  int n_freq = 0;
  std::vector<int64_t> first_ord;  // chunks: [B]
  const tensor_view* mask = nullptr;
  float mask_threshold = 0.f;
  // accumulation: every segment row's probability (summed over the query group) is copied to
  // this pinned host buffer (segment i's rows from segs[i].prob_off), then probs_done is
  // recorded; the call does not wait for the GPU
  float* probs_host = nullptr;
  cudaEvent_t probs_done = nullptr;
  const quant_layout* quant = nullptr;  // a quantized cache's sealed blocks
};

// Uploads the patches and the call's descriptors in one copy, applies the patches and runs
// the attention and merge kernels on the current stream.
void launch(const tensor_view& q4, const tensor_view& out4, int G, dtype kv_type, bool aligned, call_plan& cp,
            mirror_sync* ms, int bs, int64_t v_offset, float scale, const call_extras& ex) {
  const int D = static_cast<int>(q4.shape[3]);
  const int Tq = static_cast<int>(q4.shape[2]);
  if (D > 256) fail_value("CUDA attention supports head_dim up to 256, got " + std::to_string(D));
  const int n_qrows = Tq * G;
  const int GT = tile_for(n_qrows);
  const int n_tiles = (n_qrows + GT - 1) / GT;
  const int64_t B = q4.shape[0], Hkv = q4.shape[1] / G;
  plan_items(cp, B, Hkv, n_tiles, q4.device_id);
  int64_t total_rows = 0;
  for (seg_desc& sg : cp.segs) {
    sg.prob_off = total_rows;
    total_rows += sg.n_rows;
  }
  const cudaStream_t s = cu::stream();
  upload_buffer ub;
  const size_t o_patch = ms && !ms->empty() ? ub.add(ms->patches()) : 0;
  const size_t o_payload = ms && !ms->empty() ? ub.add(ms->payload()) : 0;
  const size_t o_segs = ub.add(cp.segs);
  const size_t o_items = ub.add(cp.items);
  const size_t o_tasks = ub.add(cp.tasks);
  const size_t o_freq = ub.add(ex.inv_freq, static_cast<size_t>(ex.n_freq) * sizeof(float));
  const size_t o_first = ub.add(ex.first_ord);
  char* dev = static_cast<char*>(cu::upload(ub.bytes().data(), ub.bytes().size(), q4.device_id, s));
  float* partial = nullptr;
  float* stats = nullptr;
  float* probs = nullptr;
  try {
    if (ms && !ms->empty()) {
      KVLOOM_LAUNCH(apply_patches_kernel, static_cast<unsigned>(ms->patches().size()), 128, 0, s)(
          reinterpret_cast<const patch*>(dev + o_patch), reinterpret_cast<const uint32_t*>(dev + o_payload));
      KV_CUDA(cudaGetLastError());
    }
    if (ms) ms->commit();
    if (ms && verify_mirrors()) ms->verify();
    {
      attn_params p{};
      p.q = q4.data;
      p.q_type = q4.type;
      p.out = out4.data;
      p.out_type = out4.type;
      for (int i = 0; i < 4; ++i) {
        p.qs[i] = q4.strides[i];
        p.os[i] = out4.strides[i];
      }
      p.G = G;
      p.D = D;
      p.Tq = Tq;
      p.n_qrows = n_qrows;
      p.qscale = (scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(D))) * 1.4426950408889634f;
      p.segs = reinterpret_cast<const seg_desc*>(dev + o_segs);
      p.items = reinterpret_cast<const item_desc*>(dev + o_items);
      p.tasks = reinterpret_cast<const task_desc*>(dev + o_tasks);
      p.inv_freq = ex.n_freq ? reinterpret_cast<const float*>(dev + o_freq) : nullptr;
      p.n_freq = ex.n_freq;
      p.bs = bs;
      p.row_bytes = static_cast<int64_t>(D) * static_cast<int64_t>(dtype_size(kv_type));
      p.v_offset = v_offset;
      p.first_ord = ex.first_ord.empty() ? nullptr : reinterpret_cast<const int64_t*>(dev + o_first);
      if (ex.mask) {
        p.mask = ex.mask->data;
        p.ms0 = ex.mask->strides[0];
        p.ms1 = ex.mask->strides[1];
        p.ms2 = ex.mask->strides[2];
        p.mask_type = ex.mask->type;
        p.mask_threshold = ex.mask_threshold;
      }
      const kernel_shape shape = ex.quant ? kernel_shape{D <= 64 ? 8 : D <= 128 ? 16 : 32, 8, false} : shape_for(kv_type, D, aligned);
      if (ex.quant) {
        p.q_bits = ex.quant->bits;
        p.q_vgroup = ex.quant->value_group;
        p.q_row_bytes = static_cast<int64_t>(ex.quant->code_row_bytes());
        p.q_kparams = static_cast<int64_t>(ex.quant->key_params);
        p.q_vcodes = static_cast<int64_t>(ex.quant->value_codes);
        p.q_vparams = static_cast<int64_t>(ex.quant->value_params);
      }
      KV_CUDA(cu::malloc_async(reinterpret_cast<void**>(&partial),
                              std::max<size_t>(1, cp.items.size()) * GT * (D + 2) * sizeof(float), s));
      p.partial = partial;
      if (ex.probs_host) {
        KV_CUDA(cu::malloc_async(reinterpret_cast<void**>(&stats), std::max<size_t>(1, cp.tasks.size()) * GT * 2 * sizeof(float), s));
        KV_CUDA(cu::malloc_async(reinterpret_cast<void**>(&probs), std::max<int64_t>(1, total_rows) * sizeof(float), s));
        KV_CUDA(cudaMemsetAsync(probs, 0, std::max<int64_t>(1, total_rows) * sizeof(float), s));
        p.final_stats = stats;
      }
      const kernel_fn k = pick_kernel(kv_type, GT, shape, ex.quant != nullptr);
      const size_t smem = sizeof(float) * kWarps * GT * (2 + shape.L * shape.E);  // < 48 KiB
      if (!cp.items.empty()) {  // (no items: every head is empty, and the merge writes zeros)
        KVLOOM_LAUNCH(k, static_cast<unsigned>(cp.items.size()), kThreads, smem, s)(p);
        KV_CUDA(cudaGetLastError());
      }
      const kernel_fn merge = pick_merge(GT);
      KVLOOM_LAUNCH(merge, static_cast<unsigned>(cp.tasks.size()), 128, 0, s)(p);
      KV_CUDA(cudaGetLastError());
      if (ex.probs_host) {  // the probabilities pass over the keys, read back without waiting
        p.probs = probs;
        if (!cp.items.empty()) {
          KVLOOM_LAUNCH(k, static_cast<unsigned>(cp.items.size()), kThreads, smem, s)(p);
          KV_CUDA(cudaGetLastError());
        }
        if (total_rows)
          KV_CUDA(cudaMemcpyAsync(ex.probs_host, probs, static_cast<size_t>(total_rows) * sizeof(float),
                                  cudaMemcpyDeviceToHost, s));
        KV_CUDA(cudaEventRecord(ex.probs_done, s));
      }
    }
  } catch (...) {
    for (const void* x : {static_cast<const void*>(partial), static_cast<const void*>(stats), static_cast<const void*>(probs),
                          static_cast<const void*>(dev)})
      cu::release(x, s);
    throw;
  }
  for (const void* x : {static_cast<const void*>(partial), static_cast<const void*>(stats), static_cast<const void*>(probs),
                        static_cast<const void*>(dev)})
    cu::release(x, s);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// q [B, Hq, D] seen as [B, Hq, 1, D].
tensor_view as_4d(const tensor_view& t) {
  tensor_view v = t;
  v.ndim = 4;
  v.shape[3] = t.shape[2];
  v.strides[3] = t.strides[2];
  v.shape[2] = 1;
  v.strides[2] = 0;
  return v;
}

}  // namespace

namespace {

// One segment per (row, view segment, kv head), in that order, each reading its store's
// mirror (made current first).
void add_cache_segments(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views, mirror_sync& ms,
                        call_plan& cp) {
  const int64_t Hkv = c.n_kv_heads();
  cp.segs_of.resize(views.size() * static_cast<size_t>(Hkv));
  for (size_t b = 0; b < views.size(); ++b)
    for (const cache_segment& view : views[b])
      for (int64_t h = 0; h < Hkv; ++h) {
        const head_store& hs = c.store(layer, static_cast<int>(h), view.seq);
        const mirror_state* m = ms.sync(hs);
        seg_desc sg{};
        sg.blocks = m->blocks;
        sg.ords = m->ords;
        sg.n_rows = static_cast<int64_t>(hs.table_.size()) * c.block_size();
        sg.delta = view.delta;
        cp.segs_of[b * Hkv + h].push_back(static_cast<int32_t>(cp.segs.size()));
        cp.segs.push_back(sg);
      }
}

}  // namespace

namespace {

// A decode step's probabilities on their way to the slots' scores: a pinned buffer the
// attention call copies them into, and the event recorded after the copy.
class pending_probs final : public deferred_scores {
 public:
  explicit pending_probs(int64_t rows) {
    host_ = static_cast<float*>(cu::take_pinned(static_cast<size_t>(std::max<int64_t>(rows, 1)) * sizeof(float), &cap_));
    if (cudaEventCreateWithFlags(&done_, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      cu::give_pinned(host_, cap_);
      host_ = nullptr;
      done_ = nullptr;
      throw std::runtime_error("CUDA error in cudaEventCreateWithFlags (accumulated attention readback)");
    }
  }
  ~pending_probs() override {
    if (host_ && done_ && cudaEventSynchronize(done_) == cudaSuccess) cu::give_pinned(host_, cap_);
    // (a failed wait, e.g. at exit after the CUDA runtime shut down, leaks the buffer rather
    // than reuse one a copy may still write)
    if (done_) cudaEventDestroy(done_);
    cudaGetLastError();
  }
  float* host() const { return host_; }
  cudaEvent_t done() const { return done_; }
  void add(head_store* hs, int64_t first, int64_t rows) { parts_.push_back({hs, first, rows}); }

  void apply() override {
    KV_CUDA(cudaEventSynchronize(done_));
    for (const part& pt : parts_) {
      const float* pr = host_ + pt.first;
      const int64_t n = std::min<int64_t>(pt.rows, pt.hs->n_slots());
      for (int64_t r = 0; r < n; ++r)
        if (pt.hs->live_[r]) pt.hs->score_[r] += pr[r];
    }
    parts_.clear();
    cu::give_pinned(host_, cap_);
    host_ = nullptr;
  }

 private:
  struct part {
    head_store* hs;
    int64_t first, rows;
  };
  float* host_ = nullptr;
  size_t cap_ = 0;
  cudaEvent_t done_ = nullptr;
  std::vector<part> parts_;
};

}  // namespace

void cuda_attend_cache(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views,
                       const tensor_view& q, const tensor_view& out, float scale, const rope_spec& rope, bool accumulate) {
  const block_pool& pool = c.pool();
  const int64_t Hkv = c.n_kv_heads();
  const int G = static_cast<int>(q.shape[1] / Hkv);
  device_scope ds(q.device_id);
  std::lock_guard<std::mutex> lock(g_mirror_mu);
  mirror_sync ms(pool, c.sealed_pool(), q.device_id, cu::stream());
  call_plan cp;
  add_cache_segments(c, layer, views, ms, cp);
  call_extras ex;
  ex.inv_freq = rope.inv_freq;
  ex.n_freq = rope.n_freq;
  ex.quant = c.sealed_pool() ? c.sealed_pool()->quant() : nullptr;
  std::shared_ptr<pending_probs> pending;
  if (accumulate) {
    int64_t rows = 0;
    for (const seg_desc& sg : cp.segs) rows += sg.n_rows;
    pending = std::make_shared<pending_probs>(rows);
    ex.probs_host = pending->host();
    ex.probs_done = pending->done();
  }
  launch(as_4d(q), as_4d(out), G, pool.type(), true, cp, &ms, pool.block_size(), static_cast<int64_t>(pool.value_offset()),
         scale, ex);
  if (!accumulate) return;
  // each live slot's probability goes into its accumulated score when the cache settles this
  // layer (scores are host metadata the device never mirrors; the caller holds a write scope
  // on these sequences, and every later reader of the scores settles first)
  size_t si = 0;
  for (const auto& view_b : views)
    for (const cache_segment& view : view_b)
      for (int64_t h = 0; h < Hkv; ++h, ++si)
        pending->add(&const_cast<head_store&>(c.store(layer, static_cast<int>(h), view.seq)), cp.segs[si].prob_off,
                     cp.segs[si].n_rows);
  c.defer_scores(layer, std::move(pending));
}

void cuda_chunk_attention(const cache& c, int layer, const std::vector<int64_t>& seqs, const std::vector<int64_t>& appended,
                          const tensor_view& q, const tensor_view* mask, float mask_threshold, const tensor_view& out,
                          float scale) {
  const block_pool& pool = c.pool();
  const int64_t Hkv = c.n_kv_heads(), Tq = q.shape[2];
  const int G = static_cast<int>(q.shape[1] / Hkv);
  device_scope ds(q.device_id);
  std::lock_guard<std::mutex> lock(g_mirror_mu);
  mirror_sync ms(pool, c.sealed_pool(), q.device_id, cu::stream());
  call_plan cp;
  std::vector<std::vector<cache_segment>> views;
  call_extras ex;
  ex.quant = c.sealed_pool() ? c.sealed_pool()->quant() : nullptr;
  ex.mask = mask;
  ex.mask_threshold = mask_threshold;
  for (size_t b = 0; b < seqs.size(); ++b) {
    views.push_back({{seqs[b], 0}});
    ex.first_ord.push_back(appended[b] - Tq);
  }
  add_cache_segments(c, layer, views, ms, cp);
  launch(q, out, G, pool.type(), true, cp, &ms, pool.block_size(), static_cast<int64_t>(pool.value_offset()), scale, ex);
}

void cuda_attend_dense(const tensor_view& q, const std::vector<dense_segment>& segments, const tensor_view& out, float scale,
                       const rope_spec& rope) {
  const int64_t B = q.shape[0], Hkv = segments[0].k.shape[1];
  const int G = static_cast<int>(q.shape[1] / Hkv);
  const dtype kv_type = segments[0].k.type;
  const int64_t esz = static_cast<int64_t>(dtype_size(kv_type));
  device_scope ds(q.device_id);
  call_plan cp;
  cp.segs_of.resize(static_cast<size_t>(B * Hkv));
  bool aligned = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (const dense_segment& s : segments) {
        seg_desc sg{};
        sg.k = static_cast<const char*>(s.k.data) + (b * s.k.strides[0] + h * s.k.strides[1]) * esz;
        sg.v = static_cast<const char*>(s.v.data) + (b * s.v.strides[0] + h * s.v.strides[1]) * esz;
        sg.k_stride = s.k.strides[2] * esz;
        sg.v_stride = s.v.strides[2] * esz;
        sg.n_rows = s.k.shape[2];
        sg.delta = s.delta ? s.delta[b] : 0;
        aligned = aligned && aligned16(sg.k) && aligned16(sg.v) && sg.k_stride % 16 == 0 && sg.v_stride % 16 == 0;
        cp.segs_of[b * Hkv + h].push_back(static_cast<int32_t>(cp.segs.size()));
        cp.segs.push_back(sg);
      }
  call_extras ex;
  ex.inv_freq = rope.inv_freq;
  ex.n_freq = rope.n_freq;
  launch(as_4d(q), as_4d(out), G, kv_type, aligned, cp, nullptr, 1, 0, scale, ex);
}

int64_t cuda_table_upload_words() { return g_table_words.load(std::memory_order_relaxed); }

}  // namespace detail
}  // namespace kvloom
