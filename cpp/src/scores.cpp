// Accumulated attention per slot (H2O's heavy-hitter statistic), computed over the cache's
// head stores: scores of the given queries against each head's live keys, softmax, and the
// probabilities added to the slots. Plain loops: the decode-time cost is one query per row.
#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "cuda_backend.h"
#include "device.h"
#include "kernels.h"
#include "kvloom/cache.h"
#include "scores.h"
#include "thread_pool.h"

namespace kvloom {

namespace {

// One head's live keys in append (ord) order, laid out in panels for the strip kernel
// (zero keys pad the last panel; they are never part of a softmax).
struct key_panels {
  std::vector<int64_t> slots, ords;
  std::vector<float> panels;
  int64_t n_panels = 0;
};

key_panels load_panels(const head_store& hs, const block_pool& pool, const block_pool* qpool) {
  key_panels kp;
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live(sl)) kp.slots.push_back(sl);
  std::sort(kp.slots.begin(), kp.slots.end(), [&](int64_t a, int64_t b) { return hs.ord(a) < hs.ord(b); });
  const int64_t L = static_cast<int64_t>(kp.slots.size()), D = pool.head_dim();
  kp.ords.resize(kp.slots.size());
  kp.n_panels = (L + detail::kPanel - 1) / detail::kPanel;
  kp.panels.assign(static_cast<size_t>(kp.n_panels * D * detail::kPanel), 0.f);
  for (int64_t i = 0; i < L; ++i) kp.ords[i] = hs.ord(kp.slots[i]);
  // the keys in fp32 on the host, in ord order (one batched read for device pools)
  std::vector<float> keys(static_cast<size_t>(L * D));
  detail::store_rows_f32(hs, pool, qpool, kp.slots, keys.data(), nullptr);
  for (int64_t i = 0; i < L; ++i) {
    float* dst = &kp.panels[static_cast<size_t>((i / detail::kPanel) * D * detail::kPanel + i % detail::kPanel)];
    for (int64_t d = 0; d < D; ++d) dst[d * detail::kPanel] = keys[static_cast<size_t>(i * D + d)];
  }
  return kp;
}

#ifdef KVLOOM_WITH_CUDA
// A head's live slots in ord order.
std::vector<int64_t> slots_by_ord(const head_store& hs) {
  std::vector<int64_t> slots;
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live(sl)) slots.push_back(sl);
  std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return hs.ord(a) < hs.ord(b); });
  return slots;
}

// The device statistics (cuda_prompt_stats): keys described on the host (row address, ord),
// summed on the GPU. slots[bh]: each head's live slots in ord order, the order of the per-key
// outputs; with `window`, also near and rows (FastGen's profiling).
void device_stats(const std::vector<const head_store*>& heads, const block_pool& pool, const tensor_view& q, int64_t G,
                  int64_t H, float scale, bool window, int64_t local_window, std::vector<std::vector<int64_t>>& slots,
                  std::vector<float>& acc, std::vector<float>& near, std::vector<double>& rows) {
  std::vector<detail::stat_head> sh;
  std::vector<detail::stat_key> keys;
  const int bs = pool.block_size();
  const size_t row = static_cast<size_t>(pool.head_dim()) * dtype_size(pool.type());
  slots.resize(heads.size());
  for (size_t bh = 0; bh < heads.size(); ++bh) {
    const head_store& hs = *heads[bh];
    slots[bh] = slots_by_ord(hs);
    sh.push_back({static_cast<int64_t>(bh) / H, static_cast<int64_t>(bh) % H, static_cast<int64_t>(keys.size()),
                  static_cast<int64_t>(slots[bh].size()), hs.appended()});
    for (int64_t sl : slots[bh])
      keys.push_back({static_cast<const char*>(pool.block_keys(hs.table()[sl / bs])) + static_cast<size_t>(sl % bs) * row,
                      hs.ord(sl)});
  }
  acc.assign(keys.size(), 0.f);
  near.assign(window ? keys.size() : 0, 0.f);
  rows.assign(window ? heads.size() : 0, 0.0);
  detail::cuda_prompt_stats(q, G, pool.type(), pool.head_dim(), sh, keys, scale, local_window, acc.data(),
                            window ? near.data() : nullptr, rows.data());
}
#endif

// Accumulated attention for a few query rows (Tq * G <= kFewRows, e.g. a decode step): every
// head's live keys are read once, in place, in block order (no sort, no panels): scores of all
// rows for all keys, then each row's softmax, then the probabilities added to the slots.
constexpr int64_t kFewRows = 64;

void accumulate_few(const std::vector<head_store*>& heads, const block_pool& pool, const block_pool* qpool,
                    const tensor_view& q, int64_t G, int64_t H, float scale) {
  const int64_t Tq = q.shape[2], D = q.shape[3], rows = Tq * G;
  const int R = static_cast<int>((rows + 15) / 16 * 16);
  const int bs = pool.block_size();
  const dtype kv_type = pool.type();
  const detail::kernel_ops& ops = detail::select_ops(static_cast<int>(D));
  const float qscale = scale * 1.4426950408889634f;
  const int64_t qsz = static_cast<int64_t>(dtype_size(q.type));
  detail::parallel_for(static_cast<int64_t>(heads.size()), [&](int64_t bh, int) {
    head_store& hs = *heads[static_cast<size_t>(bh)];
    const int64_t b = bh / H, h = bh % H;
    thread_local std::vector<float> qt, sc, kf, dq;
    thread_local std::vector<int64_t> slot_of;
    if (hs.length() == 0) return;
    qt.assign(static_cast<size_t>(R * D), 0.f);
    for (int64_t t = 0; t < Tq; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const char* src = static_cast<const char*>(q.data) + (b * q.strides[0] + (h * G + g) * q.strides[1] + t * q.strides[2]) * qsz;
        for (int64_t d = 0; d < D; ++d)
          qt[static_cast<size_t>(d * R + t * G + g)] = load_as_f32(src, q.type, static_cast<size_t>(d * q.strides[3])) * qscale;
      }
    sc.resize(static_cast<size_t>(hs.length() * R));
    kf.resize(static_cast<size_t>(bs * D));
    slot_of.clear();
    int64_t n = 0;
    for (size_t bi = 0; bi < hs.table().size(); ++bi) {
      if (hs.table()[bi] < 0 || hs.block_live()[bi] == 0) continue;
      const char* kb;
      dtype bt = kv_type;
      if (hs.sealed(bi)) {  // a quantized block: its rows dequantized first
        dq.resize(static_cast<size_t>(2 * bs * D));
        ops.dequant(*qpool->quant(), qpool->block_keys(hs.table()[bi]), bs, dq.data(), dq.data() + bs * D);
        kb = reinterpret_cast<const char*>(dq.data());
        bt = dtype::f32;
      } else {
        kb = static_cast<const char*>(pool.block_keys(hs.table()[bi]));
      }
      const size_t besz = dtype_size(bt);
      const float* K = reinterpret_cast<const float*>(kb);
      const bool in_place = bt == dtype::f32 && hs.block_live()[bi] == bs;  // fp32 rows read where they are
      int k = 0;
      for (int r = 0; r < bs; ++r) {
        const int64_t slot = static_cast<int64_t>(bi) * bs + r;
        if (!hs.live(slot)) continue;
        if (!in_place)
          for (int64_t d = 0; d < D; ++d)
            kf[static_cast<size_t>(k * D + d)] = load_as_f32(kb + r * D * besz, bt, static_cast<size_t>(d));
        slot_of.push_back(slot);
        ++k;
      }
      ops.chunk_scores(qt.data(), R, static_cast<int>(D), in_place ? K : kf.data(), D, k, sc.data() + n * R);
      n += k;
    }
    // causal: query t is the token at appended - Tq + t (a decode step's single query sees every key)
    const int64_t first = hs.appended() - Tq;
    if (Tq > 1)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t o = hs.ord(slot_of[i]);
        if (o <= first) continue;
        for (int64_t r = 0; r < rows; ++r)
          if (o > first + r / G) sc[static_cast<size_t>(i * R + r)] = -std::numeric_limits<float>::infinity();
      }
    thread_local std::vector<float> st;
    st.assign(static_cast<size_t>(3 * R), 0.f);
    float* m = st.data();
    float* l = m + R;
    float* alpha = l + R;
    std::fill(m, m + R, -std::numeric_limits<float>::infinity());
    ops.chunk_softmax(sc.data(), static_cast<int>(n), R, m, l, alpha);  // one pass: every key at once
    for (int64_t r = 0; r < R; ++r) alpha[r] = r < rows && l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float* p = sc.data() + i * R;
      float add = 0.f;
      for (int64_t r = 0; r < rows; ++r) add += p[r] * alpha[r];
      hs.score_[slot_of[i]] += add;
    }
  });
}

// q as a host tensor: itself on the host; a host copy for a CUDA q (which must be contiguous).
detail::host_tensor query_on_host(const tensor_view& q) {
  if (q.device != device_kind::cpu) {
    int64_t expect = 1;
    for (int i = q.ndim - 1; i >= 0; --i) {
      if (q.shape[i] > 1 && q.strides[i] != expect) fail_value("a CUDA q for the prompt statistics must be contiguous");
      expect *= q.shape[i];
    }
  }
  return detail::tensor_on_host(q);
}

constexpr int64_t kChunkTokens = 16;  // query tokens per parallel task

// Softmax of every query row of q against its kv head's live keys, causal (query t of Tq is
// token appended - Tq + t and sees the keys whose ord is at most its own), tiled: a strip of
// query rows against all visible keys at a time, never the Tq x L map. Work is split into
// (sequence, kv head, chunk of query tokens) tasks over the thread pool; for each query row
// that sees at least one key, visit(worker, task_bh, q_ord, p, n, z) gets p, the
// unnormalised probabilities of the first n keys of keys[task_bh] (ord order), and z their sum.
template <class Visit>
void for_each_query(const std::vector<key_panels>& keys, const std::vector<int64_t>& appended, const tensor_view& q,
                    int64_t H, int64_t G, float scale, Visit&& visit) {
  const int64_t BH = static_cast<int64_t>(keys.size()), Tq = q.shape[2], D = q.shape[3];
  const int64_t n_chunks = (Tq + kChunkTokens - 1) / kChunkTokens;
  const int64_t qsz = static_cast<int64_t>(dtype_size(q.type));
  const detail::kernel_ops& ops = detail::select_ops(static_cast<int>(D));
  const float qscale = scale * 1.4426950408889634f;  // scores in the log2 domain
  detail::parallel_for(BH * n_chunks, [&](int64_t task, int worker) {
    const int64_t bh = task / n_chunks, chunk = task % n_chunks, b = bh / H, h = bh % H;
    const key_panels& kp = keys[static_cast<size_t>(bh)];
    if (kp.slots.empty()) return;
    const int64_t lds = kp.n_panels * detail::kPanel;
    std::vector<float> qbuf(static_cast<size_t>(detail::kStripRows * D)), strip(static_cast<size_t>(detail::kStripRows * lds));
    const int64_t t_end = std::min(Tq, (chunk + 1) * kChunkTokens);
    const int64_t n_rows = (t_end - chunk * kChunkTokens) * G;
    for (int64_t r0 = 0; r0 < n_rows; r0 += detail::kStripRows) {
      const int nq = static_cast<int>(std::min<int64_t>(detail::kStripRows, n_rows - r0));
      int64_t q_ord[detail::kStripRows], n_vis[detail::kStripRows], n_max = 0;
      for (int j = 0; j < nq; ++j) {
        const int64_t t = chunk * kChunkTokens + (r0 + j) / G, g = (r0 + j) % G;
        const char* src = static_cast<const char*>(q.data) + (b * q.strides[0] + (h * G + g) * q.strides[1] + t * q.strides[2]) * qsz;
        for (int64_t d = 0; d < D; ++d) qbuf[j * D + d] = load_as_f32(src, q.type, static_cast<size_t>(d * q.strides[3])) * qscale;
        q_ord[j] = appended[static_cast<size_t>(bh)] - Tq + t;
        n_vis[j] = std::upper_bound(kp.ords.begin(), kp.ords.end(), q_ord[j]) - kp.ords.begin();
        n_max = std::max(n_max, n_vis[j]);
      }
      if (n_max == 0) continue;
      ops.score_strip(qbuf.data(), nq, static_cast<int>(D), kp.panels.data(), (n_max + detail::kPanel - 1) / detail::kPanel,
                      strip.data(), lds);
      for (int j = 0; j < nq; ++j) {
        if (n_vis[j] == 0) continue;
        float* p = strip.data() + j * lds;
        const float z = ops.exp2_row(p, n_vis[j]);
        visit(worker, bh, q_ord[j], p, n_vis[j], z);
      }
    }
  });
}

// Panels of every (batch row, kv head) of one layer, built in parallel.
std::vector<key_panels> layer_panels(const std::vector<const head_store*>& heads, const block_pool& pool,
                                     const block_pool* qpool) {
  std::vector<key_panels> keys(heads.size());
  detail::parallel_for(static_cast<int64_t>(heads.size()), [&](int64_t i, int) {
    keys[static_cast<size_t>(i)] = load_panels(*heads[static_cast<size_t>(i)], pool, qpool);
  });
  return keys;
}

}  // namespace

int64_t cache::check_query_rows(int layer, const std::vector<int64_t>& seqs, const tensor_view& q) const {
  check_layer(layer);
  check_rank(q, 4, "q");
  check_float(q, "q");
  check_device(q, pool_->device(), pool_->device_id(), "q");
  const int64_t B = q.shape[0], Hq = q.shape[1], Tq = q.shape[2], D = q.shape[3];
  if (static_cast<int64_t>(seqs.size()) != B)
    fail_value("need one sequence per batch row: " + std::to_string(seqs.size()) + " for batch " + std::to_string(B));
  if (D != head_dim()) fail_value("q head_dim " + std::to_string(D) + " != cache head_dim " + std::to_string(head_dim()));
  if (Hq % n_kv_heads_ != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" + std::to_string(n_kv_heads_) + ")");
  std::set<int64_t> distinct;
  for (int64_t s : seqs) {
    if (!distinct.insert(s).second) fail_value("sequence " + std::to_string(s) + " named twice");
    if (store(layer, 0, s).appended() < Tq)
      fail_value("more queries than tokens appended to sequence " + std::to_string(s));
  }
  return Hq / n_kv_heads_;
}

void cache::accumulate_attention(int layer, const std::vector<int64_t>& seqs, const tensor_view& q_in, float scale) {
  use_scope scope(*this, seqs, true, "accumulate_attention");
  const int64_t G = check_query_rows(layer, seqs, q_in);
  settle_scores(layer);
  const float sc = scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(head_dim()));
  const int64_t B = q_in.shape[0], H = n_kv_heads_;
  std::vector<head_store*> heads;
  std::vector<const head_store*> cheads;
  std::vector<int64_t> appended;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      heads.push_back(&mutable_store(layer, static_cast<int>(h), seqs[b]));
      cheads.push_back(heads.back());
      appended.push_back(heads.back()->appended());
    }
#ifdef KVLOOM_WITH_CUDA
  if (pool_->device() == device_kind::cuda && !qpool_) {  // (quantized: from the host's copy of the keys, below)
    std::vector<std::vector<int64_t>> slots;
    std::vector<float> acc, unused;
    std::vector<double> no_rows;
    device_stats(cheads, *pool_, q_in, G, H, sc, false, 0, slots, acc, unused, no_rows);
    size_t k = 0;
    for (size_t bh = 0; bh < heads.size(); ++bh)
      for (int64_t sl : slots[bh]) heads[bh]->score_[sl] += acc[k++];
    return;
  }
#endif
  const detail::host_tensor hq = query_on_host(q_in);
  const tensor_view& q = hq.view;
  if (q.shape[2] * G <= kFewRows && pool_->device() == device_kind::cpu) {  // a decode step (or a few tokens): straight from the blocks
    accumulate_few(heads, *pool_, qpool_.get(), q, G, H, sc);
    return;
  }
  const std::vector<key_panels> keys = layer_panels(cheads, *pool_, qpool_.get());
  const int W = detail::pool_threads();
  std::vector<std::vector<float>> add(static_cast<size_t>(W) * heads.size());  // per worker, per head
  for_each_query(keys, appended, q, H, G, sc, [&](int worker, int64_t bh, int64_t, const float* p, int64_t n, float z) {
    std::vector<float>& a = add[static_cast<size_t>(worker) * heads.size() + bh];
    if (a.empty()) a.assign(keys[static_cast<size_t>(bh)].slots.size(), 0.f);
    const float inv = 1.f / z;
    for (int64_t i = 0; i < n; ++i) a[i] += p[i] * inv;
  });
  for (size_t bh = 0; bh < heads.size(); ++bh)
    for (int w = 0; w < W; ++w) {
      const std::vector<float>& a = add[static_cast<size_t>(w) * heads.size() + bh];
      for (size_t i = 0; i < a.size(); ++i) heads[bh]->score_[keys[bh].slots[i]] += a[i];
    }
}


// A most-significant-digit-first radix select. A decode step of H2O or FastGen ranks about a
// thousand keys per head, most of them close to the median: std::nth_element's comparisons
// there go either way at random and mispredict about half the time, which made the selection
// the largest part of FastGen's per-step policy work. Here each round finds the highest bit
// on which the candidates differ (an AND/OR reduction), counts the 8-bit digit from there
// down (no data-dependent branch; two interleaved histograms so that runs of one digit do
// not wait on each other's increments) and keeps the one bucket that holds the answer. Scores
// agree on their sign and most exponent bits, so the digits start inside the exponent and
// two or three rounds leave a few dozen keys for nth_element. (11-bit digits measured no
// faster: more buckets to clear and scan.)
uint64_t kth_heaviest(std::vector<uint64_t>& keys, int64_t keep) {
  constexpr int kBits = 8;
  constexpr uint32_t kBuckets = 1u << kBits;
  uint64_t* a = keys.data();
  size_t n = keys.size();
  uint64_t k = static_cast<uint64_t>(keep);  // the answer is the k-th largest of a[0, n)
  while (n > 48) {
    uint64_t all = ~uint64_t{0}, any = 0;
    for (size_t i = 0; i < n; ++i) {
      all &= a[i];
      any |= a[i];
    }
    const uint64_t differ = all ^ any;
    if (differ == 0) return a[0];  // all n keys are equal
    const int top = 63 - __builtin_clzll(differ);
    const int shift = top >= kBits - 1 ? top - (kBits - 1) : 0;
    uint32_t h0[kBuckets] = {}, h1[kBuckets] = {};
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
      ++h0[(a[i] >> shift) & (kBuckets - 1)];
      ++h1[(a[i + 1] >> shift) & (kBuckets - 1)];
    }
    if (i < n) ++h0[(a[i] >> shift) & (kBuckets - 1)];
    uint32_t b = kBuckets - 1;
    uint64_t above = 0;  // keys in the buckets above b
    while (above + h0[b] + h1[b] < k) {
      above += h0[b] + h1[b];
      --b;
    }
    k -= above;
    size_t m = 0;  // the keys of bucket b move to the front, in order
    for (size_t j = 0; j < n; ++j) {
      const uint64_t x = a[j];
      a[m] = x;
      m += ((x >> shift) & (kBuckets - 1)) == b;
    }
    n = m;
  }
  std::nth_element(a, a + (k - 1), a + n, std::greater<uint64_t>());
  return a[k - 1];
}

std::vector<char> top_by_score(const head_store& hs, const std::vector<int64_t>& slots, double ratio, int64_t n_base) {
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t keep = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(ratio * static_cast<double>(n_base))));
  std::vector<char> top(slots.size(), keep >= n ? 1 : 0);
  if (keep <= 0 || keep >= n) return top;
  thread_local std::vector<uint64_t> keys;
  const uint64_t kth = heavy_threshold(hs, slots.data(), slots.size(), keep, keys);
  for (size_t i = 0; i < slots.size(); ++i) top[i] = keys[i] >= kth;
  return top;
}

// FastGen's level of each key (ord order): 0 special, 1 punctuation, 2 frequent, 3 the rest.
std::vector<char> fastgen_levels(const head_store& hs, const std::vector<int64_t>& slots, double r_frequent) {
  const std::vector<char> freq = top_by_score(hs, slots, r_frequent, static_cast<int64_t>(slots.size()));
  std::vector<char> lv(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    const uint8_t c = hs.token_class(slots[i]);
    lv[i] = (c & kClassSpecial) ? 0 : (c & kClassPunct) ? 1 : freq[i] ? 2 : 3;
  }
  return lv;
}

namespace {

void check_recovery_args(double r_frequent, int64_t local_window) {
  if (!(r_frequent >= 0.0 && r_frequent <= 1.0)) fail_value("r_frequent must be in [0, 1]");
  if (local_window < 0) fail_value("local_window must be >= 0");
}

// FastGen's masses of one head (out[0..4)) from per-key sums over the keys of `slots` (ord
// order): levels 0-2 keep each key's attention from every query (the arrays of `all`, summed),
// level 3 its attention from the queries within the local window after it (`near`); n_queries
// rows saw a key. Ranks the frequent keys by the scores as they are now.
void masses_from_sums(const head_store& hs, const std::vector<int64_t>& slots, double r_frequent,
                      const std::vector<const float*>& all, const std::vector<const float*>& near, double n_queries,
                      double* out) {
  const std::vector<char> lv = fastgen_levels(hs, slots, r_frequent);
  double m[4] = {0, 0, 0, 0};
  for (size_t w = 0; w < all.size(); ++w) {
    if (!all[w]) continue;
    for (size_t i = 0; i < slots.size(); ++i) m[static_cast<int>(lv[i])] += lv[i] < 3 ? all[w][i] : near[w][i];
  }
  const double cum[4] = {m[0], m[0] + m[1], m[0] + m[1] + m[2], m[0] + m[1] + m[2] + m[3]};
  for (int j = 0; j < 4; ++j) out[j] = n_queries > 0 ? cum[j] / n_queries : 0.0;
}

// hybrid_recovery, and with `accumulate` also accumulate_attention's update of the scores from
// the same probabilities (the caller holds the cache as non-const). The masses come from
// per-key sums: the attention each key receives from all of the queries (levels 0-2) and from
// the queries within local_window after it (level 3), so a query's visit only adds its
// probabilities, and the frequent set is ranked once the scores hold this call's addition.
void recovery_pass(const cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q_in, float scale,
                   double r_frequent, int64_t local_window, double* out, bool accumulate) {
  cache::use_scope scope(c, seqs, accumulate, accumulate ? "accumulate_with_recovery" : "hybrid_recovery");
  const int64_t G = c.check_query_rows(layer, seqs, q_in);
  c.settle_scores(layer);  // (the frequent tokens are ranked by score)
  check_recovery_args(r_frequent, local_window);
  const float sc = scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(c.head_dim()));
  const int64_t B = q_in.shape[0], H = c.n_kv_heads();
  std::vector<const head_store*> heads;
  std::vector<int64_t> appended;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      heads.push_back(&c.store(layer, static_cast<int>(h), seqs[b]));
      appended.push_back(heads.back()->appended());
    }
  const size_t BH = heads.size();
#ifdef KVLOOM_WITH_CUDA
  if (c.pool().device() == device_kind::cuda && !c.sealed_pool()) {  // the same per-key sums, from one launch
    std::vector<std::vector<int64_t>> slots;
    std::vector<float> all, near;
    std::vector<double> rows;
    device_stats(heads, c.pool(), q_in, G, H, sc, true, local_window, slots, all, near, rows);
    size_t k = 0;
    for (size_t bh = 0; bh < BH; ++bh) {
      if (accumulate) {
        head_store& hs = const_cast<head_store&>(*heads[bh]);
        for (size_t i = 0; i < slots[bh].size(); ++i) hs.score_[slots[bh][i]] += all[k + i];
      }
      masses_from_sums(*heads[bh], slots[bh], r_frequent, {all.data() + k}, {near.data() + k}, rows[bh], out + bh * 4);
      k += slots[bh].size();
    }
    return;
  }
#endif
  const detail::host_tensor hq = query_on_host(q_in);
  const tensor_view& q = hq.view;
  const std::vector<key_panels> keys = layer_panels(heads, c.pool(), c.sealed_pool());
  const int W = detail::pool_threads();
  // per worker, per head: each key's attention from every query and from the queries within
  // local_window after it ([keys] each), and the number of queries
  std::vector<std::vector<float>> all(static_cast<size_t>(W) * BH), near(static_cast<size_t>(W) * BH);
  std::vector<double> count(static_cast<size_t>(W) * BH, 0.0);
  for_each_query(keys, appended, q, H, G, sc, [&](int worker, int64_t bh, int64_t q_ord, const float* p, int64_t n, float z) {
    const size_t at = static_cast<size_t>(worker) * BH + static_cast<size_t>(bh);
    std::vector<float>& a = all[at];
    std::vector<float>& w = near[at];
    if (a.empty()) {
      a.assign(keys[static_cast<size_t>(bh)].slots.size(), 0.f);
      w.assign(a.size(), 0.f);
    }
    const std::vector<int64_t>& ords = keys[static_cast<size_t>(bh)].ords;
    const int64_t lo = std::lower_bound(ords.begin(), ords.begin() + n, q_ord - local_window + 1) - ords.begin();
    const float inv = 1.f / z;
    for (int64_t i = 0; i < lo; ++i) a[i] += p[i] * inv;
    for (int64_t i = lo; i < n; ++i) {
      const float x = p[i] * inv;
      a[i] += x;
      w[i] += x;
    }
    count[at] += 1;
  });
  for (size_t bh = 0; bh < BH; ++bh) {
    const std::vector<int64_t>& slots = keys[bh].slots;
    if (accumulate) {  // as accumulate_attention adds them: worker by worker
      head_store& hs = const_cast<head_store&>(*heads[bh]);
      for (int wk = 0; wk < W; ++wk) {
        const std::vector<float>& a = all[static_cast<size_t>(wk) * BH + bh];
        for (size_t i = 0; i < a.size(); ++i) hs.score_[slots[i]] += a[i];
      }
    }
    std::vector<const float*> a_w, n_w;
    double n_queries = 0;
    for (int wk = 0; wk < W; ++wk) {
      const size_t at = static_cast<size_t>(wk) * BH + bh;
      n_queries += count[at];
      a_w.push_back(all[at].empty() ? nullptr : all[at].data());
      n_w.push_back(near[at].empty() ? nullptr : near[at].data());
    }
    masses_from_sums(*heads[bh], slots, r_frequent, a_w, n_w, n_queries, out + bh * 4);
  }
}

}  // namespace

void hybrid_recovery(const cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                     double r_frequent, int64_t local_window, double* out) {
  recovery_pass(c, layer, seqs, q, scale, r_frequent, local_window, out, false);
}

void accumulate_with_recovery(cache& c, int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                              double r_frequent, int64_t local_window, double* out) {
  recovery_pass(c, layer, seqs, q, scale, r_frequent, local_window, out, true);
}

}  // namespace kvloom
