#include "kvloom/attention.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <limits>
#include <string>

#include "cuda_backend.h"
#include "diagnostics.h"
#include "head_store.h"
#include "kernels.h"
#include "thread_pool.h"

namespace kvloom {

namespace {

using detail::kernel_ops;
using detail::kv_chunk;

// The best kernel path allowed: 0 any, 1 at most AVX2, 2 generic only (tests, benchmarks;
// KVLOOM_ISA=avx2|generic sets it at start-up).
int isa_cap_from_env() {
  const char* e = std::getenv("KVLOOM_ISA");
  if (!e) return 0;
  const std::string v(e);
  return v == "generic" ? 2 : v == "avx2" ? 1 : 0;
}
std::atomic<int> g_isa_cap{isa_cap_from_env()};

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

const kernel_ops& pick_ops(int D) {
  const int cap = g_isa_cap.load();
  const kernel_ops* w = detail::avx512_ops();
  if (w && cap == 0 && cpu_has_avx512() && D % 16 == 0) return *w;
  const kernel_ops* v = detail::avx2_ops();
  if (v && cap <= 1 && cpu_has_avx2() && D % 8 == 0) return *v;
  return detail::generic_ops();
}

constexpr int kDenseChunk = 32;
constexpr float kLog2e = 1.4426950408889634f;

// Asks the memory system for the next chunk's rows while the current one is computed:
// decode attention streams each key/value once, so hiding memory latency is most of the game.
inline void prefetch_chunk(const kv_chunk& c, int64_t esz, int64_t row_bytes) {
  if (c.quant) {  // one run of bytes
    for (size_t off = 0; off < c.quant->bytes; off += 64) __builtin_prefetch(static_cast<const char*>(c.k) + off);
    return;
  }
  const char* k = static_cast<const char*>(c.k);
  const char* v = static_cast<const char*>(c.v);
  for (int t = 0; t < c.n; ++t) {
    const char* kr = k + t * c.k_stride * esz;
    const char* vr = v + t * c.v_stride * esz;
    for (int64_t off = 0; off < row_bytes; off += 64) {
      __builtin_prefetch(kr + off);
      __builtin_prefetch(vr + off);
    }
  }
}

using detail::head_task;

struct work_item {
  int64_t task;
  int64_t c0, c1;
};

// Runs decode attention over prepared chunks. q [B, Hq, D], out [B, Hq, D];
// deltas[b * n_seg + s] is segment s's angle offset for row b. With `scores` (one pointer per
// chunk: the accumulated-attention slots of its block's rows), each row's final attention
// probability, summed over its kv head's query group, is added there: the weights each chunk
// leaves in the kernel's scratch (kernels.h) are kept with the running max they are relative
// to, and rescaled by the final max and sum once the splits are merged.
void run_decode_host(const tensor_view& q, const tensor_view& out, int64_t Hkv, dtype kv_type,
                     const std::vector<kv_chunk>& chunks, const std::vector<head_task>& tasks, int n_seg,
                     const std::vector<int64_t>& deltas, float scale, const rope_spec& rope,
                     const std::vector<float*>* scores = nullptr) {
  const int64_t Hq = q.shape[1];
  const int D = static_cast<int>(q.shape[2]);
  const int G = static_cast<int>(Hq / Hkv);
  const kernel_ops& ops = pick_ops(D);
  const float qscale = (scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(D))) * kLog2e;

  // Split long heads across threads; merge the partial softmax states afterwards.
  // Small problems (short contexts) run on the calling thread: waking workers costs more.
  int64_t total_rows = 0;
  for (const kv_chunk& c : chunks) total_rows += c.n;
  const bool inline_run = total_rows * G * D < (int64_t(1) << 19);
  const int threads = inline_run ? 1 : detail::pool_threads();
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int64_t want_items = std::max<int64_t>(n_tasks, 8 * threads);  // many items: dynamic scheduling balances them
  // items of about equal size whatever each head holds (per-head policies leave them ragged),
  // at least 8 chunks each
  const int64_t per_item = std::max<int64_t>(8, (static_cast<int64_t>(chunks.size()) + want_items - 1) / want_items);
  std::vector<work_item> items;
  std::vector<int64_t> task_first_item(static_cast<size_t>(n_tasks) + 1, 0);
  for (int64_t ti = 0; ti < n_tasks; ++ti) {
    const head_task& t = tasks[ti];
    const int64_t nc = t.c1 - t.c0;
    const int64_t splits = std::max<int64_t>(1, (nc + per_item - 1) / per_item);
    task_first_item[ti] = static_cast<int64_t>(items.size());
    for (int64_t s = 0; s < splits; ++s)
      items.push_back({ti, t.c0 + nc * s / splits, t.c0 + nc * (s + 1) / splits});
  }
  task_first_item[n_tasks] = static_cast<int64_t>(items.size());

  const int64_t state = static_cast<int64_t>(G) * (D + 2);  // m[G], l[G], acc[G*D]
  std::vector<float> partial(items.size() * static_cast<size_t>(state));
  // accumulation: chunk c's weights at weights[w_at[c] ..] ([G][n]), its running max at run_max[c * G ..]
  std::vector<int64_t> w_at;
  std::vector<float> weights, run_max;
  if (scores) {
    w_at.resize(chunks.size());
    int64_t total = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      w_at[c] = total;
      total += static_cast<int64_t>(G) * chunks[c].n;
    }
    weights.resize(static_cast<size_t>(total));  // (every element is written before it is read)
    run_max.resize(chunks.size() * static_cast<size_t>(G));
  }
  const int64_t qsz = static_cast<int64_t>(dtype_size(q.type));
  const int64_t kv_esz = static_cast<int64_t>(dtype_size(kv_type));
  const int64_t row_bytes = static_cast<int64_t>(D) * kv_esz;

  auto process = [&](int64_t ii, int) {
    thread_local std::vector<float> buf;
    const work_item& it = items[ii];
    const head_task& t = tasks[it.task];
    int max_n = kDenseChunk;
    for (int64_t c = it.c0; c < it.c1; ++c) max_n = std::max(max_n, chunks[c].n);
    const int64_t need = 2 * static_cast<int64_t>(G) * D + state + 16 + detail::quant_scratch_floats(G, max_n, D);
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(static_cast<size_t>(need));
    float* qbase = buf.data();      // [G][D] scaled queries
    float* qrot = qbase + G * D;    // [G][D] rotated for the current segment
    // The running state lives in this thread's own buffer while the item runs (the shared
    // `partial` array would put neighbouring items' accumulators on shared cache lines).
    float* st = qrot + G * D;       // m[G], l[G], acc[G][D]
    float* scratch = st + state + 16;
    for (int g = 0; g < G; ++g) {
      const char* src = static_cast<const char*>(q.data) +
                        (t.b * q.strides[0] + (t.h * G + g) * q.strides[1]) * qsz;
      for (int d = 0; d < D; ++d) qbase[g * D + d] = load_as_f32(src, q.type, static_cast<size_t>(d * q.strides[2])) * qscale;
    }
    float* m = st;
    float* l = st + G;
    float* acc = st + 2 * G;
    std::fill(m, m + G, -std::numeric_limits<float>::infinity());
    std::fill(l, l + G, 0.f);
    std::fill(acc, acc + G * D, 0.f);
    int cur_seg = -1;
    const float* qcur = qbase;
    for (int64_t c = it.c0; c < it.c1; ++c) {
      const kv_chunk& ch = chunks[c];
      if (ch.seg != cur_seg) {
        cur_seg = ch.seg;
        const int64_t delta = deltas.empty() ? 0 : deltas[t.b * n_seg + cur_seg];
        if (delta == 0 || rope.n_freq == 0) {
          qcur = qbase;
        } else {
          const int nf = rope.n_freq;
          for (int g = 0; g < G; ++g) {
            const float* x = qbase + g * D;
            float* y = qrot + g * D;
            for (int i = 0; i < nf; ++i) {
              const double ang = static_cast<double>(delta) * static_cast<double>(rope.inv_freq[i]);
              const float cs = static_cast<float>(std::cos(ang)), sn = static_cast<float>(std::sin(ang));
              y[i] = x[i] * cs - x[i + nf] * sn;
              y[i + nf] = x[i + nf] * cs + x[i] * sn;
            }
            for (int d = 2 * nf; d < D; ++d) y[d] = x[d];
          }
          qcur = qrot;
        }
      }
      if (c + 1 < it.c1) prefetch_chunk(chunks[c + 1], kv_esz, row_bytes);
      if (ch.quant) ops.attend_quant(qcur, G, D, *ch.quant, ch.k, ch.live, ch.n, m, l, acc, scratch);
      else ops.attend_chunk(qcur, G, D, ch, kv_type, m, l, acc, scratch);
      if (scores) {
        std::copy(scratch, scratch + static_cast<int64_t>(G) * ch.n, weights.data() + w_at[c]);
        std::copy(m, m + G, run_max.data() + c * G);
      }
    }
    std::copy(st, st + state, partial.data() + ii * state);
  };
  if (inline_run) {
    for (int64_t ii = 0; ii < static_cast<int64_t>(items.size()); ++ii) process(ii, 0);
  } else {
    detail::parallel_for(static_cast<int64_t>(items.size()), process);
  }

  // Merge the splits of each head and write out = acc / l (cheap: done by the caller).
  const int64_t osz = static_cast<int64_t>(dtype_size(out.type));
  std::vector<float> o(static_cast<size_t>(D));
  // per task and query row: the final max and 1 / sum (accumulation only; -inf, 0: no weight)
  std::vector<std::pair<float, float>> final_stats(
      scores ? static_cast<size_t>(n_tasks * G) : 0, {-std::numeric_limits<float>::infinity(), 0.f});
  for (int64_t ti = 0; ti < n_tasks; ++ti) {
    const head_task& t = tasks[ti];
    const int64_t i0 = task_first_item[ti], i1 = task_first_item[ti + 1];
    for (int g = 0; g < G; ++g) {
      const float ninf = -std::numeric_limits<float>::infinity();
      float M = ninf;
      bool poisoned = false;  // a split saw a NaN score (kernels.h: poison_if_nan)
      for (int64_t i = i0; i < i1; ++i) {
        const float mi = partial[i * state + g];
        poisoned = poisoned || mi != mi;
        M = std::fmax(M, mi);
      }
      float L = 0.f;
      char* dst = static_cast<char*>(out.data) + (t.b * out.strides[0] + (t.h * G + g) * out.strides[1]) * osz;
      if (poisoned) {  // a NaN score
        for (int d = 0; d < D; ++d)
          store_from_f32(dst, out.type, static_cast<size_t>(d * out.strides[2]), std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      if (M == ninf) {  // no live key, or only -inf scores: the zero-weighted sum (zeros, or NaN)
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t i = i0; i < i1; ++i)
          for (int d = 0; d < D; ++d) o[d] += partial[i * state + 2 * G + g * D + d];
        for (int d = 0; d < D; ++d) store_from_f32(dst, out.type, static_cast<size_t>(d * out.strides[2]), o[d]);
        continue;
      }
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t i = i0; i < i1; ++i) {
        const float* st = partial.data() + i * state;
        const float w = std::exp2(st[g] - M);
        L += st[G + g] * w;
        const float* a = st + 2 * G + g * D;
        for (int d = 0; d < D; ++d) o[d] += a[d] * w;
      }
      const float inv = 1.f / L;
      for (int d = 0; d < D; ++d) store_from_f32(dst, out.type, static_cast<size_t>(d * out.strides[2]), o[d] * inv);
      if (scores) final_stats[ti * G + g] = {M, inv};
    }
  }
  if (!scores) return;
  // each row's probability = weight * 2^(its chunk's running max - M) / L, summed over the group
  auto add_task = [&](int64_t ti, int) {
    thread_local std::vector<float> add;
    for (int64_t c = tasks[ti].c0; c < tasks[ti].c1; ++c) {
      const int n = chunks[c].n;
      const float* w = weights.data() + w_at[c];
      add.assign(static_cast<size_t>(n), 0.f);
      for (int g = 0; g < G; ++g) {
        const auto [M, inv] = final_stats[ti * G + g];
        if (M == -std::numeric_limits<float>::infinity() || inv == 0.f) continue;
        const float f = std::exp2(run_max[c * G + g] - M) * inv;
        for (int t = 0; t < n; ++t) add[t] += w[g * n + t] * f;
      }
      float* dst = (*scores)[c];
      for (int t = 0; t < n; ++t)
        if (!chunks[c].live || chunks[c].live[t]) dst[t] += add[t];
    }
  };
  for (int64_t ti = 0; ti < n_tasks; ++ti) add_task(ti, 0);  // (on the workers it measured slower: their wake-up)
}

[[noreturn, maybe_unused]] void no_cuda() {
  fail_value("a CUDA tensor reached attention, but this build of kvloom has no CUDA backend");
}

void check_q_out(const tensor_view& q, const tensor_view& out) {
  check_rank(q, 3, "q");
  check_float(q, "q");
  check_rank(out, 3, "out");
  check_float(out, "out");
  check_device(out, q.device, q.device_id, "out");
  if (out.shape[0] != q.shape[0] || out.shape[1] != q.shape[1] || out.shape[2] != q.shape[2])
    fail_value("out must have the shape of q " + q.describe() + ", got " + out.describe());
  if (q.shape[2] < 1) fail_value("head_dim must be >= 1");
}

void check_rope(const rope_spec& rope, int64_t D) {
  if (rope.n_freq < 0 || 2 * static_cast<int64_t>(rope.n_freq) > D)
    fail_value("rope: inv_freq has " + std::to_string(rope.n_freq) + " entries; at most head_dim/2 = " +
               std::to_string(D / 2) + " allowed");
  if (rope.n_freq > 0 && !rope.inv_freq) fail_value("rope: inv_freq is null");
}

}  // namespace

void decode_attention_dense(const tensor_view& q, const std::vector<dense_segment>& segments, const tensor_view& out,
                            float scale, const rope_spec& rope) {
  check_q_out(q, out);
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  check_rope(rope, D);
  if (segments.empty()) fail_value("decode attention needs at least one key/value segment");
  const dense_segment& s0 = segments[0];
  const int64_t Hkv = s0.k.ndim == 4 ? s0.k.shape[1] : 0;
  dtype kv_type = s0.k.type;
  int64_t total_T = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const dense_segment& s = segments[i];
    for (const tensor_view* t : {&s.k, &s.v}) {
      const char* what = t == &s.k ? "k" : "v";
      check_rank(*t, 4, what);
      check_float(*t, what);
      check_device(*t, q.device, q.device_id, what);
      check_inner_contiguous(*t, what);
      if (t->type != kv_type) fail_type("k and v of every segment must share one dtype");
      if (t->shape[0] != B) fail_value(std::string(what) + " batch " + std::to_string(t->shape[0]) + " != q batch " + std::to_string(B));
      if (t->shape[1] != Hkv) fail_value("k and v must have the same number of kv heads in every segment");
      if (t->shape[3] != D) fail_value(std::string(what) + " head_dim " + std::to_string(t->shape[3]) + " != q head_dim " + std::to_string(D));
    }
    if (s.v.shape[2] != s.k.shape[2]) fail_value("k and v must have the same length, got " + s.k.describe() + " and " + s.v.describe());
    if (s.delta && rope.n_freq == 0)
      for (int64_t b = 0; b < B; ++b)
        if (s.delta[b] != 0) fail_value("a nonzero rope delta needs inv_freq");
    total_T += s.k.shape[2];
  }
  if (Hkv < 1 || Hq % Hkv != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" + std::to_string(Hkv) + ")");
  if (total_T < 1) fail_value("decode attention needs at least one key (k has length 0)");
  if (total_T > std::numeric_limits<int32_t>::max())
    fail_value("decode attention over " + std::to_string(total_T) + " keys: at most 2^31 - 1 are supported");
  if (B == 0) return;
  if (q.device == device_kind::cuda) {
#ifdef KVLOOM_WITH_CUDA
    return detail::cuda_attend_dense(q, segments, out, scale, rope);
#else
    no_cuda();
#endif
  }

  const int n_seg = static_cast<int>(segments.size());
  std::vector<int64_t> deltas(static_cast<size_t>(B * n_seg), 0);
  for (int s = 0; s < n_seg; ++s)
    if (segments[s].delta)
      for (int64_t b = 0; b < B; ++b) deltas[b * n_seg + s] = segments[s].delta[b];

  std::vector<kv_chunk> chunks;
  std::vector<head_task> tasks;
  const int64_t esz = static_cast<int64_t>(dtype_size(kv_type));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      head_task t{b, h, static_cast<int64_t>(chunks.size()), 0};
      for (int s = 0; s < n_seg; ++s) {
        const tensor_view& K = segments[s].k;
        const tensor_view& V = segments[s].v;
        for (int64_t t0 = 0; t0 < K.shape[2]; t0 += kDenseChunk) {
          kv_chunk c;
          c.k = static_cast<const char*>(K.data) + (b * K.strides[0] + h * K.strides[1] + t0 * K.strides[2]) * esz;
          c.v = static_cast<const char*>(V.data) + (b * V.strides[0] + h * V.strides[1] + t0 * V.strides[2]) * esz;
          c.k_stride = K.strides[2];
          c.v_stride = V.strides[2];
          c.live = nullptr;
          c.n = static_cast<int32_t>(std::min<int64_t>(kDenseChunk, K.shape[2] - t0));
          c.seg = s;
          chunks.push_back(c);
        }
      }
      t.c1 = static_cast<int64_t>(chunks.size());
      tasks.push_back(t);
    }
  run_decode_host(q, out, Hkv, kv_type, chunks, tasks, n_seg, deltas, scale, rope);
}

void decode_attention_quantized(const tensor_view& q, const tensor_view& blocks, int64_t T, const quant_layout& L,
                                const tensor_view& out, float scale) {
  check_q_out(q, out);
  check_cpu(q, "q");
  check_rank(blocks, 4, "blocks");
  check_dtype(blocks, dtype::u8, "blocks");
  check_cpu(blocks, "blocks");
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  if (D != L.head_dim) fail_value("q head_dim " + std::to_string(D) + " != the blocks' head_dim " + std::to_string(L.head_dim));
  const int64_t Hkv = blocks.shape[1], nb = blocks.shape[2];
  if (blocks.shape[0] != B) fail_value("blocks batch " + std::to_string(blocks.shape[0]) + " != q batch " + std::to_string(B));
  if (blocks.shape[3] != static_cast<int64_t>(L.bytes) || blocks.strides[3] != 1)
    fail_value("blocks must be [B, Hkv, n_blocks, " + std::to_string(L.bytes) + "] with contiguous blocks, got " + blocks.describe());
  if (Hkv < 1 || Hq % Hkv != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" + std::to_string(Hkv) + ")");
  if (T < 1 || T > nb * L.block_size)
    fail_value("T = " + std::to_string(T) + " tokens, the blocks hold 1.." + std::to_string(nb * L.block_size));
  std::vector<kv_chunk> chunks;
  std::vector<head_task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      head_task t{b, h, static_cast<int64_t>(chunks.size()), 0};
      for (int64_t bi = 0; bi * L.block_size < T; ++bi) {
        kv_chunk c{};
        c.k = static_cast<const uint8_t*>(blocks.data) + b * blocks.strides[0] + h * blocks.strides[1] + bi * blocks.strides[2];
        c.n = static_cast<int32_t>(std::min<int64_t>(L.block_size, T - bi * L.block_size));
        c.quant = &L;
        chunks.push_back(c);
      }
      t.c1 = static_cast<int64_t>(chunks.size());
      tasks.push_back(t);
    }
  run_decode_host(q, out, Hkv, dtype::f32, chunks, tasks, 1, {}, scale, rope_spec{});
}

namespace {

// The chunks of a decode call over the cache (one per held block of each segment's head
// store) and its tasks; with `scores`, also each chunk's accumulated-attention slots.
void cache_chunks(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views, int n_seg,
                  std::vector<int64_t>& deltas, std::vector<kv_chunk>& chunks, std::vector<head_task>& tasks,
                  std::vector<float*>* scores) {
  const int64_t B = static_cast<int64_t>(views.size()), Hkv = c.n_kv_heads(), D = c.head_dim();
  const int bs = c.block_size();
  const block_pool& pool = c.pool();
  for (int64_t b = 0; b < B; ++b) {
    for (size_t s = 0; s < views[b].size(); ++s) deltas[b * n_seg + s] = views[b][s].delta;
    for (int64_t h = 0; h < Hkv; ++h) {
      head_task t{b, h, static_cast<int64_t>(chunks.size()), 0};
      for (size_t s = 0; s < views[b].size(); ++s) {
        const head_store& hs = c.store(layer, static_cast<int>(h), views[b][s].seq);
        const auto& table = hs.table();
        for (size_t bi = 0; bi < table.size(); ++bi) {
          if (table[bi] < 0 || hs.block_live()[bi] == 0) continue;
          kv_chunk ch;
          if (hs.sealed(bi)) {  // a quantized block (kvloom/quant.h)
            ch.k = c.sealed_pool()->block_keys(table[bi]);
            ch.v = nullptr;
            ch.quant = c.sealed_pool()->quant();
          } else {
            ch.k = pool.block_keys(table[bi]);
            ch.v = pool.block_values(table[bi]);
          }
          ch.k_stride = ch.v_stride = D;
          ch.live = hs.block_live()[bi] == bs ? nullptr : hs.live_data() + bi * bs;
          ch.n = bs;
          ch.seg = static_cast<int32_t>(s);
          chunks.push_back(ch);
          // (the caller holds a write scope on the sequence: its scores may change)
          if (scores) scores->push_back(const_cast<head_store&>(hs).score_.data() + bi * bs);
        }
      }
      t.c1 = static_cast<int64_t>(chunks.size());
      tasks.push_back(t);
    }
  }
}

}  // namespace

void decode_attention_cache(const cache& c, int layer, const std::vector<std::vector<cache_segment>>& views,
                            const tensor_view& q, const tensor_view& out, float scale, const rope_spec& rope) {
  check_q_out(q, out);
  check_device(q, c.pool().device(), c.pool().device_id(), "q");
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  check_rope(rope, D);
  const int64_t Hkv = c.n_kv_heads();
  if (D != c.head_dim()) fail_value("q head_dim " + std::to_string(D) + " != cache head_dim " + std::to_string(c.head_dim()));
  if (Hq % Hkv != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of the cache's kv heads (" + std::to_string(Hkv) + ")");
  if (static_cast<int64_t>(views.size()) != B)
    fail_value("need one view per batch row: " + std::to_string(views.size()) + " views for batch " + std::to_string(B));
  std::vector<int64_t> seen;
  for (const auto& vw : views)
    for (const auto& sg : vw) seen.push_back(sg.seq);
  cache::use_scope scope(c, seen, false, "decode attention");
  int n_seg = 0;
  for (const auto& vw : views) {
    if (vw.empty()) fail_value("every batch row needs at least one sequence to attend to");
    n_seg = std::max(n_seg, static_cast<int>(vw.size()));
    for (const auto& sg : vw) {
      c.store(layer, 0, sg.seq);  // validates layer and sequence
      if (sg.delta != 0 && rope.n_freq == 0) fail_value("a nonzero rope delta needs inv_freq");
    }
  }
  if (B == 0) return;
  if (q.device == device_kind::cuda) {
#ifdef KVLOOM_WITH_CUDA
    return detail::cuda_attend_cache(c, layer, views, q, out, scale, rope);
#else
    no_cuda();
#endif
  }
  std::vector<int64_t> deltas(static_cast<size_t>(B * n_seg), 0);
  std::vector<kv_chunk> chunks;
  std::vector<head_task> tasks;
  cache_chunks(c, layer, views, n_seg, deltas, chunks, tasks, nullptr);
  run_decode_host(q, out, Hkv, c.type(), chunks, tasks, n_seg, deltas, scale, rope);
}

void decode_attention_accumulate(cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q,
                                 const tensor_view& out, float scale) {
  check_q_out(q, out);
  check_device(q, c.pool().device(), c.pool().device_id(), "q");
  const int64_t B = q.shape[0], D = q.shape[2];
  std::vector<std::vector<cache_segment>> views;
  for (int64_t s : seqs) views.push_back({{s, 0}});
  tensor_view q4 = q;  // [B, Hq, 1, D]: the statistics' view of the same query
  q4.ndim = 4;
  q4.shape[3] = D;
  q4.strides[3] = q.strides[2];
  q4.shape[2] = 1;
  q4.strides[2] = D * q.strides[2];
  cache::use_scope scope(c, seqs, true, "decode attention with accumulation");
  c.check_query_rows(layer, seqs, q4);  // distinct, non-empty sequences; shapes
  c.settle_scores(layer);               // (at most one update of a layer queued)
  if (B == 0) return;
  if (q.device == device_kind::cuda) {
#ifdef KVLOOM_WITH_CUDA
    return detail::cuda_attend_cache(c, layer, views, q, out, scale, rope_spec{}, true);
#else
    no_cuda();
#endif
  }
  std::vector<int64_t> deltas(static_cast<size_t>(B), 0);
  std::vector<kv_chunk> chunks;
  std::vector<head_task> tasks;
  std::vector<float*> scores;
  cache_chunks(c, layer, views, 1, deltas, chunks, tasks, &scores);
  const float sc = scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(D));
  run_decode_host(q, out, c.n_kv_heads(), c.type(), chunks, tasks, 1, deltas, sc, rope_spec{}, &scores);
}

namespace {

// Whether the mask lets query t of row b see the key with this ord.
inline bool mask_allows(const tensor_view* mask, int64_t b, int64_t t, int64_t ord, float threshold) {
  if (!mask) return true;
  const int64_t idx[3] = {b, t, ord};
  const void* p = mask->at(idx);
  if (mask->type == dtype::u8) return *static_cast<const uint8_t*>(p) != 0;
  return load_as_f32(p, mask->type, 0) > threshold;
}

constexpr int64_t kChunkTile = 16;  // query tokens per task
// keys per softmax step of chunk attention (whole blocks; at least one), and the most scores a
// step holds (their [S][R] matrix is written, read and rewritten within the step)
constexpr int64_t kStepKeys = 256;
constexpr int64_t kStepScores = 12288;

bool all_finite(const float* x, int n, int64_t D) {
  for (int64_t i = 0; i < n * D; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

}  // namespace

void chunk_attention_cache(const cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q,
                           const tensor_view* mask, const tensor_view& out, float scale) {
  check_rank(q, 4, "q");
  check_float(q, "q");
  check_device(q, c.pool().device(), c.pool().device_id(), "q");
  check_rank(out, 4, "out");
  check_float(out, "out");
  check_device(out, c.pool().device(), c.pool().device_id(), "out");
  const int64_t B = q.shape[0], Hq = q.shape[1], Tq = q.shape[2], D = q.shape[3];
  for (int i = 0; i < 4; ++i)
    if (out.shape[i] != q.shape[i]) fail_value("out must have the shape of q " + q.describe() + ", got " + out.describe());
  if (D != c.head_dim()) fail_value("q head_dim " + std::to_string(D) + " != cache head_dim " + std::to_string(c.head_dim()));
  const int64_t Hkv = c.n_kv_heads();
  if (Hq % Hkv != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" + std::to_string(Hkv) + ")");
  if (static_cast<int64_t>(seqs.size()) != B)
    fail_value("need one sequence per batch row: " + std::to_string(seqs.size()) + " for batch " + std::to_string(B));
  cache::use_scope scope(c, seqs, false, "chunk attention");
  std::vector<int64_t> appended(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    appended[b] = c.store(layer, 0, seqs[b]).appended();  // validates layer and sequence
    if (appended[b] < Tq)
      fail_value("the chunk's " + std::to_string(Tq) + " tokens must be appended to sequence " + std::to_string(seqs[b]) +
                 " first (it holds " + std::to_string(appended[b]) + ")");
  }
  float threshold = 0.f;
  if (mask) {
    check_rank(*mask, 3, "mask");
    check_device(*mask, c.pool().device(), c.pool().device_id(), "mask");
    if (mask->type != dtype::u8 && !dtype_is_float(mask->type)) fail_type("mask must be bool/uint8 or a float additive mask");
    if (mask->shape[0] != B || mask->shape[1] != Tq)
      fail_value("mask must be [batch=" + std::to_string(B) + ", tokens=" + std::to_string(Tq) + ", K], got " + mask->describe());
    for (int64_t b = 0; b < B; ++b)
      if (mask->shape[2] < appended[b])
        fail_value("mask covers " + std::to_string(mask->shape[2]) + " positions; row " + std::to_string(b) + " has " +
                   std::to_string(appended[b]) + " tokens");
    threshold = mask->type == dtype::f16 ? -32752.f : mask->type == dtype::u8 ? 0.f : -1.7e38f;
  }
  if (B == 0 || Tq == 0) return;
  if (q.device == device_kind::cuda) {
#ifdef KVLOOM_WITH_CUDA
    return detail::cuda_chunk_attention(c, layer, seqs, appended, q, mask, threshold, out, scale);
#else
    no_cuda();
#endif
  }
  const int64_t G = Hq / Hkv;
  const int64_t n_tiles = (Tq + kChunkTile - 1) / kChunkTile;
  const int bs = c.block_size();
  const block_pool& pool = c.pool();
  const dtype kv_type = c.type();
  const detail::kernel_ops& ops = pick_ops(static_cast<int>(D));
  const float qscale = (scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(D))) * kLog2e;
  const int64_t qsz = static_cast<int64_t>(dtype_size(q.type)), osz = static_cast<int64_t>(dtype_size(out.type));
  detail::parallel_for(B * Hkv * n_tiles, [&](int64_t task, int) {
    const int64_t b = task / (Hkv * n_tiles), h = (task / n_tiles) % Hkv, tile = task % n_tiles;
    const int64_t t0 = tile * kChunkTile, nt = std::min(kChunkTile, Tq - t0);
    const int rows = static_cast<int>(nt * G);
    const int R = (rows + 15) / 16 * 16;  // query rows padded for the vector kernels
    const head_store& hs = c.store(layer, static_cast<int>(h), seqs[b]);
    // Keys are taken in steps of whole blocks, up to kStepKeys of them (at least one block):
    // the scores of a step, one softmax update, then its weighted values, so the accumulators
    // are reloaded and rescaled once a step, not once a block.
    const int64_t S = std::max<int64_t>(bs, std::min<int64_t>(kStepKeys, kStepScores / R) / bs * bs);
    // per task: queries transposed [D][R], accumulators [R][D], softmax state [R] x 3, a step's
    // scores [S][R], fp32 copies of its rows that cannot be read in place (keys, values [S][D]
    // each), and its sealed blocks dequantized (keys then values, [bs][D] each, per block)
    thread_local std::vector<float> buf;
    thread_local std::vector<int32_t> ords_buf;
    thread_local std::vector<const float*> vrows_buf;
    const int64_t need = 2 * R * D + 3 * R + S * R + 4 * S * D;
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(static_cast<size_t>(need));
    if (static_cast<int64_t>(ords_buf.size()) < S) {
      ords_buf.resize(static_cast<size_t>(S));
      vrows_buf.resize(static_cast<size_t>(S));
    }
    float* qt = buf.data();
    float* acc = qt + R * D;
    float* m = acc + R * D;
    float* l = m + R;
    float* alpha = l + R;
    float* sc = alpha + R;
    float* kf = sc + S * R;
    float* vf = kf + S * D;
    float* dq = vf + S * D;
    int32_t* ords = ords_buf.data();
    const float** vrows = vrows_buf.data();
    std::fill(qt, qt + R * D, 0.f);
    for (int64_t j = 0; j < nt; ++j)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = j * G + g;
        const char* src = static_cast<const char*>(q.data) +
                          (b * q.strides[0] + (h * G + g) * q.strides[1] + (t0 + j) * q.strides[2]) * qsz;
        for (int64_t d = 0; d < D; ++d)
          qt[d * R + r] = load_as_f32(src, q.type, static_cast<size_t>(d * q.strides[3])) * qscale;
      }
    std::fill(m, m + R, -std::numeric_limits<float>::infinity());
    std::fill(l, l + R, 0.f);
    std::fill(acc, acc + R * D, 0.f);
    const int64_t first_ord = appended[b] - Tq + t0;  // ord of the tile's first query
    const int64_t last_ord = first_ord + nt - 1;
    const float ninf = -std::numeric_limits<float>::infinity();
    auto hidden = [&](int k, int r) {  // causality inside the chunk, and the caller's mask (k: row of the step)
      const int64_t j = r / G;
      return ords[k] > first_ord + j || !mask_allows(mask, b, t0 + j, ords[k], threshold);
    };
    int step_n = 0;  // keys in the step so far
    int step_blocks = 0;
    bool some_hidden = false;
    auto flush = [&] {
      if (step_n == 0) return;
      ops.chunk_softmax(sc, step_n, R, m, l, alpha);
      bool finite = true;
      if (some_hidden)
        for (int k = 0; k < step_n && finite; ++k) finite = all_finite(vrows[k], 1, D);
      if (!finite) {
        // a hidden row's NaN/inf value must not reach the queries that do not see it (p = 0
        // there, and 0 * inf is NaN): the exact loop skips hidden pairs (rare: non-finite V)
        for (int r = 0; r < rows; ++r) {
          float* a = acc + static_cast<int64_t>(r) * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha[r];
          for (int k = 0; k < step_n; ++k) {
            if (hidden(k, r)) continue;
            const float w = sc[static_cast<int64_t>(k) * R + r];
            for (int64_t d = 0; d < D; ++d) a[d] += w * vrows[k][d];
          }
        }
      } else {
        ops.chunk_pv(acc, R, static_cast<int>(D), sc, step_n, vrows, alpha);
      }
      step_n = 0;
      step_blocks = 0;
      some_hidden = false;
    };
    const auto& table = hs.table();
    for (size_t bi = 0; bi < table.size(); ++bi) {
      if (table[bi] < 0 || hs.block_live()[bi] == 0) continue;
      // the block's keys this tile may see: live, and not after its last query
      int n = 0;
      bool all_used = true;
      for (int r = 0; r < bs; ++r) {
        const int64_t slot = static_cast<int64_t>(bi) * bs + r;
        const bool use = hs.live(slot) && hs.ord(slot) <= last_ord;
        all_used = all_used && use;
        if (use) n++;
      }
      if (n == 0) continue;
      if (step_n + n > S || step_blocks == S / bs) flush();
      const char* kb;
      const char* vb;
      dtype bt = kv_type;
      if (hs.sealed(bi)) {
        float* dk = dq + static_cast<int64_t>(step_blocks) * 2 * bs * D;  // S / bs blocks a step at most
        ops.dequant(*c.sealed_pool()->quant(), c.sealed_pool()->block_keys(table[bi]), bs, dk, dk + static_cast<int64_t>(bs) * D);
        kb = reinterpret_cast<const char*>(dk);
        vb = reinterpret_cast<const char*>(dk + static_cast<int64_t>(bs) * D);
        bt = dtype::f32;
      } else {
        kb = static_cast<const char*>(pool.block_keys(table[bi]));
        vb = static_cast<const char*>(pool.block_values(table[bi]));
      }
      ++step_blocks;
      const size_t esz = dtype_size(bt);
      // the used rows' ords and value rows; fp16/bf16 storage, or rows to skip: fp32 copies
      // of the used rows, read from there
      const bool copy = bt != dtype::f32 || !all_used;
      float* kd = kf + static_cast<int64_t>(step_n) * D;
      float* vd = vf + static_cast<int64_t>(step_n) * D;
      int32_t max_ord = 0;
      int u = 0;  // used rows so far
      for (int r = 0; r < bs; ++r) {
        const int64_t slot = static_cast<int64_t>(bi) * bs + r;
        if (!hs.live(slot) || hs.ord(slot) > last_ord) continue;
        ords[step_n + u] = static_cast<int32_t>(hs.ord(slot));
        max_ord = std::max(max_ord, ords[step_n + u]);
        const char* kr = kb + static_cast<size_t>(r) * D * esz;
        const char* vr = vb + static_cast<size_t>(r) * D * esz;
        if (copy)
          for (int64_t d = 0; d < D; ++d) {
            kd[u * D + d] = load_as_f32(kr, bt, static_cast<size_t>(d));
            vd[u * D + d] = load_as_f32(vr, bt, static_cast<size_t>(d));
          }
        vrows[step_n + u] = copy ? vd + u * D : reinterpret_cast<const float*>(vr);
        ++u;
      }
      const float* K = copy ? kd : reinterpret_cast<const float*>(kb);
      float* sb = sc + static_cast<int64_t>(step_n) * R;
      ops.chunk_scores(qt, R, static_cast<int>(D), K, D, n, sb);
      if (mask || max_ord > first_ord) {
        for (int k = 0; k < n; ++k) {
          float* st = sb + static_cast<int64_t>(k) * R;
          for (int r = 0; r < rows; ++r) {
            if (hidden(step_n + k, r)) {
              st[r] = ninf;
              some_hidden = true;
            }
          }
        }
      }
      step_n += n;
    }
    flush();
    for (int64_t j = 0; j < nt; ++j)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = j * G + g;
        char* dst = static_cast<char*>(out.data) + (b * out.strides[0] + (h * G + g) * out.strides[1] + (t0 + j) * out.strides[2]) * osz;
        // no visible key or only -inf scores (l == 0): the zero-weighted sum acc (zeros, or NaN
        // where a value is not finite); a NaN score (l NaN): NaN
        const float inv = l[r] == 0.f ? 1.f : 1.f / l[r];
        for (int64_t d = 0; d < D; ++d)
          store_from_f32(dst, out.type, static_cast<size_t>(d * out.strides[3]), acc[r * D + d] * inv);
      }
  });
}

void set_num_threads(int n) {
  if (n < 1) fail_value("num_threads must be >= 1, got " + std::to_string(n));
  detail::pool_resize(n);
}

int get_num_threads() { return detail::pool_threads(); }

const char* kernel_isa() { return pick_ops(64).name; }

namespace detail {
const kernel_ops& select_ops(int D) { return pick_ops(D); }
}  // namespace detail

void force_generic_kernels(bool on) { g_isa_cap.store(on ? 2 : 0); }

void force_isa(const std::string& isa) {
  if (isa == "auto") g_isa_cap.store(0);
  else if (isa == "avx2") g_isa_cap.store(1);
  else if (isa == "generic") g_isa_cap.store(2);
  else fail_value("isa must be 'auto', 'avx2' or 'generic', got '" + isa + "'");
}

double read_probe(const void* data, size_t bytes) {
  const kernel_ops& ops = pick_ops(64);
  const int64_t n = static_cast<int64_t>(bytes / sizeof(float));
  const int threads = detail::pool_threads();
  std::vector<double> sums(static_cast<size_t>(threads), 0.0);
  detail::parallel_for(threads, [&](int64_t i, int) {
    const int64_t a = n * i / threads, b = n * (i + 1) / threads;
    sums[i] = ops.sum_floats(static_cast<const float*>(data) + a, b - a);
  });
  double s = 0;
  for (double x : sums) s += x;
  return s;
}

}  // namespace kvloom
