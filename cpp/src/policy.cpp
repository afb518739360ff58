#include "kvloom/policy.h"

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

}  // namespace

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
