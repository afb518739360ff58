#include "kvloom/policy.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "kvloom/cache.h"
#include "kvloom/common.h"

namespace kvloom {

namespace {

class full_plan final : public head_plan {
 public:
  std::string name() const override { return "full"; }
  void select_evictions(const head_store&, std::vector<int32_t>&) const override {}
};

class window_plan final : public head_plan {
 public:
  window_plan(int64_t sinks, int64_t recent) : sinks_(sinks), recent_(recent) {}
  std::string name() const override { return "window"; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    const int64_t first_recent = hs.appended() - recent_;
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s) {
      if (!hs.live(s)) continue;
      const int64_t o = hs.ord(s);
      if (o >= sinks_ && o < first_recent) out.push_back(static_cast<int32_t>(s));
    }
  }

 private:
  int64_t sinks_, recent_;
};

class heavy_hitter_plan final : public head_plan {
 public:
  heavy_hitter_plan(double ratio, int64_t recent) : ratio_(ratio), recent_(recent) {}
  std::string name() const override { return "heavy_hitter"; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    const int64_t first_recent = hs.appended() - recent_;
    const int64_t keep = static_cast<int64_t>(std::ceil(ratio_ * static_cast<double>(hs.appended())));
    std::vector<int32_t> old;  // live slots outside the recent window
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s)
      if (hs.live(s) && hs.ord(s) < first_recent) old.push_back(static_cast<int32_t>(s));
    if (static_cast<int64_t>(old.size()) <= keep) return;
    // heaviest first; among equal scores the older token first
    std::sort(old.begin(), old.end(), [&](int32_t a, int32_t b) {
      if (hs.score(a) != hs.score(b)) return hs.score(a) > hs.score(b);
      return hs.ord(a) < hs.ord(b);
    });
    out.insert(out.end(), old.begin() + keep, old.end());
  }

 private:
  double ratio_;
  int64_t recent_;
};

}  // namespace

heavy_hitter_policy::heavy_hitter_policy(double ratio, int64_t recent) : ratio_(ratio), recent_(recent) {
  if (!(ratio >= 0.0 && ratio <= 1.0)) fail_value("heavy_hitter: ratio must be in [0, 1], got " + std::to_string(ratio));
  if (recent < 1) fail_value("heavy_hitter: recent must be >= 1, got " + std::to_string(recent));
  plan_ = std::make_shared<const heavy_hitter_plan>(ratio, recent);
}

std::string heavy_hitter_policy::name() const {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "heavy_hitter(ratio=%g, recent=%lld)", ratio_, static_cast<long long>(recent_));
  return buf;
}

std::shared_ptr<const head_plan> heavy_hitter_policy::plan_head(const head_key&, const head_store&, const prompt_stats*) const {
  return plan_;
}

std::shared_ptr<const head_plan> full_policy::plan_head(const head_key&, const head_store&, const prompt_stats*) const {
  static const auto plan = std::make_shared<const full_plan>();
  return plan;
}

window_policy::window_policy(int64_t sinks, int64_t recent) : sinks_(sinks), recent_(recent) {
  if (sinks < 0) fail_value("window: sinks must be >= 0, got " + std::to_string(sinks));
  if (recent < 1) fail_value("window: recent must be >= 1, got " + std::to_string(recent));
  plan_ = std::make_shared<const window_plan>(sinks, recent);
}

std::string window_policy::name() const {
  return "window(sinks=" + std::to_string(sinks_) + ", recent=" + std::to_string(recent_) + ")";
}

std::shared_ptr<const head_plan> window_policy::plan_head(const head_key&, const head_store&, const prompt_stats*) const {
  return plan_;
}

}  // namespace kvloom
