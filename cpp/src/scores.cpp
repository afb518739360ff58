// Accumulated attention per slot (H2O's heavy-hitter statistic), computed over the cache's
// head stores: scores of the given queries against each head's live keys, softmax, and the
// probabilities added to the slots. Plain loops: the decode-time cost is one query per row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "kvloom/cache.h"
#include "thread_pool.h"

namespace kvloom {

namespace {

// Dot product with 8 independent partial sums (vectorises without -ffast-math).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
}

// Softmax of each query of q[b] in kv head h's group over the head's live `slots` (causal:
// a query sees the slots whose ord is at most its own; query t of Tq is token
// appended - Tq + t). Calls visit(q_ord, p, z) for every query that sees at least one slot,
// with p the unnormalised exponentials (0 where invisible) and z their sum.
template <class Visit>
void query_probs(const head_store& hs, const block_pool& pool, const std::vector<int64_t>& slots, const tensor_view& q,
                 int64_t b, int64_t h, int64_t G, float scale, Visit&& visit) {
  const int64_t L = static_cast<int64_t>(slots.size()), D = pool.head_dim(), Tq = q.shape[2];
  const int bs = pool.block_size();
  const dtype kt = pool.type();
  const int64_t qsz = static_cast<int64_t>(dtype_size(q.type));
  std::vector<float> keys(static_cast<size_t>(L * D)), qrow(static_cast<size_t>(D)), p(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    const char* kb = static_cast<const char*>(pool.block_keys(hs.table()[slots[i] / bs]));
    const void* row = kb + static_cast<size_t>(slots[i] % bs) * D * dtype_size(kt);
    for (int64_t d = 0; d < D; ++d) keys[i * D + d] = load_as_f32(row, kt, static_cast<size_t>(d));
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < Tq; ++t) {
      const char* src = static_cast<const char*>(q.data) + (b * q.strides[0] + (h * G + g) * q.strides[1] + t * q.strides[2]) * qsz;
      for (int64_t d = 0; d < D; ++d) qrow[d] = load_as_f32(src, q.type, static_cast<size_t>(d * q.strides[3])) * scale;
      const int64_t q_ord = hs.appended() - Tq + t;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < L; ++i) {
        p[i] = hs.ord(slots[i]) <= q_ord ? dot(qrow.data(), &keys[i * D], D) : -std::numeric_limits<float>::infinity();
        mx = std::max(mx, p[i]);
      }
      if (mx == -std::numeric_limits<float>::infinity()) continue;
      double z = 0;
      for (int64_t i = 0; i < L; ++i) z += (p[i] = std::exp(p[i] - mx));
      visit(q_ord, p, z);
    }
}

std::vector<int64_t> live_slots(const head_store& hs) {
  std::vector<int64_t> slots;
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live(sl)) slots.push_back(sl);
  return slots;
}

}  // namespace

int64_t cache::check_query_rows(int layer, const std::vector<int64_t>& seqs, const tensor_view& q) const {
  check_layer(layer);
  check_rank(q, 4, "q");
  check_float(q, "q");
  check_cpu(q, "q");
  const int64_t B = q.shape[0], Hq = q.shape[1], Tq = q.shape[2], D = q.shape[3];
  if (static_cast<int64_t>(seqs.size()) != B)
    fail_value("need one sequence per batch row: " + std::to_string(seqs.size()) + " for batch " + std::to_string(B));
  if (D != head_dim()) fail_value("q head_dim " + std::to_string(D) + " != cache head_dim " + std::to_string(head_dim()));
  if (Hq % n_kv_heads_ != 0)
    fail_value("query heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" + std::to_string(n_kv_heads_) + ")");
  std::set<int64_t> distinct;
  for (int64_t s : seqs) {
    if (!distinct.insert(s).second) fail_value("sequence " + std::to_string(s) + " named twice");
    if (seq_ref(s).heads[static_cast<size_t>(layer) * n_kv_heads_].n_appended_ < Tq)
      fail_value("more queries than tokens appended to sequence " + std::to_string(s));
  }
  return Hq / n_kv_heads_;
}

void cache::accumulate_attention(int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale) {
  const int64_t G = check_query_rows(layer, seqs, q);
  const float sc = scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(head_dim()));
  detail::parallel_for(q.shape[0] * n_kv_heads_, [&](int64_t task, int) {
    const int64_t b = task / n_kv_heads_, h = task % n_kv_heads_;
    head_store& hs = seq_ref(seqs[b]).heads[static_cast<size_t>(layer) * n_kv_heads_ + h];
    const std::vector<int64_t> slots = live_slots(hs);
    std::vector<double> add(slots.size(), 0.0);
    query_probs(hs, *pool_, slots, q, b, h, G, sc, [&](int64_t, const std::vector<float>& p, double z) {
      for (size_t i = 0; i < slots.size(); ++i) add[i] += p[i] / z;
    });
    for (size_t i = 0; i < slots.size(); ++i) hs.score_[slots[i]] += static_cast<float>(add[i]);
  });
}

}  // namespace kvloom

namespace kvloom {

namespace {

// The ceil(ratio x n_base) live slots (indices into `slots`) with the highest score; ties
// keep the older token. Shared by FastGen's profiling and its decode-time plan.
std::vector<char> top_by_score(const head_store& hs, const std::vector<int64_t>& slots, double ratio, int64_t n_base) {
  std::vector<int64_t> idx(slots.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  const int64_t keep = std::min<int64_t>(static_cast<int64_t>(idx.size()),
                                         static_cast<int64_t>(std::ceil(ratio * static_cast<double>(n_base))));
  std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), [&](int64_t a, int64_t b) {
    const float sa = hs.score(slots[a]), sb = hs.score(slots[b]);
    if (sa != sb) return sa > sb;
    return hs.ord(slots[a]) < hs.ord(slots[b]);
  });
  std::vector<char> top(slots.size(), 0);
  for (int64_t i = 0; i < keep; ++i) top[idx[i]] = 1;
  return top;
}

}  // namespace

std::vector<char> fastgen_frequent(const head_store& hs, const std::vector<int64_t>& slots, double ratio, int64_t n_base) {
  return top_by_score(hs, slots, ratio, n_base);
}

void cache::hybrid_recovery(int layer, const std::vector<int64_t>& seqs, const tensor_view& q, float scale,
                            double r_frequent, int64_t local_window, double* out) const {
  const int64_t G = check_query_rows(layer, seqs, q);
  if (!(r_frequent >= 0.0 && r_frequent <= 1.0)) fail_value("r_frequent must be in [0, 1]");
  const float sc = scale > 0 ? scale : 1.f / std::sqrt(static_cast<float>(head_dim()));
  detail::parallel_for(q.shape[0] * n_kv_heads_, [&](int64_t task, int) {
    const int64_t b = task / n_kv_heads_, h = task % n_kv_heads_;
    const head_store& hs = seq_ref(seqs[b]).heads[static_cast<size_t>(layer) * n_kv_heads_ + h];
    double* res = out + task * 4;
    std::fill(res, res + 4, 0.0);
    const std::vector<int64_t> slots = live_slots(hs);
    if (slots.empty()) return;
    const std::vector<char> freq = top_by_score(hs, slots, r_frequent, static_cast<int64_t>(slots.size()));
    std::vector<int> level(slots.size());  // smallest hybrid holding the key (4: none yet)
    for (size_t i = 0; i < slots.size(); ++i) {
      const uint8_t c = hs.cls_[slots[i]];
      level[i] = (c & kClassSpecial) ? 0 : (c & kClassPunct) ? 1 : freq[i] ? 2 : 4;
    }
    int64_t n_queries = 0;
    query_probs(hs, *pool_, slots, q, b, h, G, sc, [&](int64_t q_ord, const std::vector<float>& p, double z) {
      double mass[5] = {0, 0, 0, 0, 0};
      for (size_t i = 0; i < slots.size(); ++i) {
        int lv = level[i];
        if (lv > 3 && q_ord - hs.ord_[slots[i]] < local_window) lv = 3;
        mass[lv] += p[i] / z;
      }
      double cum = 0;
      for (int j = 0; j < 4; ++j) res[j] += (cum += mass[j]);
      ++n_queries;
    });
    if (n_queries > 0)
      for (int j = 0; j < 4; ++j) res[j] /= static_cast<double>(n_queries);
  });
}

}  // namespace kvloom
