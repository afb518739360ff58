// H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
// Inference of Large Language Models"): keep the `recent` newest tokens plus the heavy
// hitters, the ceil(ratio x tokens seen) older tokens with the largest accumulated
// attention (slot score; see cache::accumulate_attention). Ties keep the older token. Under a
// byte budget the heavy hitters give way first, the lightest first; then the recent window,
// oldest first.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "../scores.h"
#include "plan_impl.h"

namespace kvloom {
namespace {

class heavy_hitter_plan final : public head_plan {
 public:
  heavy_hitter_plan(double ratio, int64_t recent) : ratio_(ratio), recent_(recent) {}
  std::string name() const override { return "heavy_hitter"; }
  std::string describe() const override {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "heavy_hitter(ratio=%g, recent=%lld)", ratio_, static_cast<long long>(recent_));
    return buf;
  }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    const int64_t first_recent = hs.appended() - recent_;
    const int64_t keep = static_cast<int64_t>(std::ceil(ratio_ * static_cast<double>(hs.appended())));
    std::vector<int32_t> old;  // live slots outside the recent window
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s)
      if (hs.live(s) && hs.ord(s) < first_recent) old.push_back(static_cast<int32_t>(s));
    if (static_cast<int64_t>(old.size()) <= keep) return;
    // the `keep` heaviest (among equal scores the older token): a partition on integer keys,
    // not a sort, so a decode step costs O(tokens) per head
    if (keep <= 0) {
      out.insert(out.end(), old.begin(), old.end());
      return;
    }
    thread_local std::vector<uint64_t> keys;
    const uint64_t kth = heavy_threshold(hs, old.data(), old.size(), keep, keys);
    size_t m = out.size();  // (no branch on the comparison: its outcome is data-dependent)
    out.resize(m + old.size());
    for (size_t i = 0; i < old.size(); ++i) {
      out[m] = old[i];
      m += keys[i] < kth;
    }
    out.resize(m);
  }
  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    if (hs.ord(slot) >= hs.appended() - recent_) return {1, static_cast<double>(hs.ord(slot))};
    return {0, static_cast<double>(hs.score(slot))};
  }

 private:
  double ratio_;
  int64_t recent_;
};

std::shared_ptr<const head_plan> make_heavy_hitter(const plan_params& p) {
  const double ratio = p.number("ratio", 0.1);
  const int64_t recent = p.integer("recent", 64);
  if (!(ratio >= 0.0 && ratio <= 1.0)) fail_value("heavy_hitter: ratio must be in [0, 1], got " + std::to_string(ratio));
  if (recent < 1) fail_value("heavy_hitter: recent must be >= 1, got " + std::to_string(recent));
  return std::make_shared<const heavy_hitter_plan>(ratio, recent);
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(heavy_hitter, "heavy_hitter", "keeps `recent` newest tokens and the heavy hitters (H2O)",
                     kvloom::make_heavy_hitter)
