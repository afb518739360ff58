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

// in scores.cpp: the frequent set FastGen profiles with
std::vector<char> fastgen_frequent(const head_store& hs, const std::vector<int64_t>& slots, double ratio, int64_t n_base);

fastgen_plan::fastgen_plan(int level, int64_t local_window, double r_frequent)
    : level_(level), local_window_(local_window), r_frequent_(r_frequent) {
  if (level < 0 || level > 4) fail_value("fastgen: hybrid level must be in [0, 4], got " + std::to_string(level));
  if (local_window < 0) fail_value("fastgen: local window must be >= 0");
  if (!(r_frequent >= 0.0 && r_frequent <= 1.0)) fail_value("fastgen: r_frequent must be in [0, 1]");
}

std::string fastgen_plan::name() const {
  static const char* names[] = {"fastgen:special", "fastgen:special+punct", "fastgen:special+punct+frequent",
                                "fastgen:special+punct+frequent+local", "fastgen:full"};
  return names[level_];
}

void fastgen_plan::select_evictions(const head_store& hs, std::vector<int32_t>& out) const {
  if (level_ == 4) return;
  std::vector<int64_t> slots;
  for (int64_t s = 0, n = hs.n_slots(); s < n; ++s)
    if (hs.live(s)) slots.push_back(s);
  std::vector<char> freq;
  if (level_ >= 2) freq = fastgen_frequent(hs, slots, r_frequent_, hs.appended());
  const int64_t newest = hs.appended() - 1;
  for (size_t i = 0; i < slots.size(); ++i) {
    const uint8_t c = hs.token_class(slots[i]);
    const bool keep = (c & kClassSpecial) || (level_ >= 1 && (c & kClassPunct)) || (level_ >= 2 && freq[i]) ||
                      (level_ >= 3 && newest - hs.ord(slots[i]) < local_window_);
    if (!keep) out.push_back(static_cast<int32_t>(slots[i]));
  }
}

keep_set_plan::keep_set_plan(std::string label, int64_t sinks, int64_t recent, std::vector<int32_t> ords, bool keep_all)
    : label_(std::move(label)), sinks_(sinks), recent_(recent), ords_(std::move(ords)), keep_all_(keep_all) {
  if (sinks < 0 || recent < 0) fail_value("keep_set: sinks and recent must be >= 0");
  std::sort(ords_.begin(), ords_.end());
}

void keep_set_plan::select_evictions(const head_store& hs, std::vector<int32_t>& out) const {
  if (keep_all_) return;
  const int64_t first_recent = hs.appended() - recent_;
  for (int64_t s = 0, n = hs.n_slots(); s < n; ++s) {
    if (!hs.live(s)) continue;
    const int32_t o = hs.ord(s);
    if (o < sinks_ || o >= first_recent || std::binary_search(ords_.begin(), ords_.end(), o)) continue;
    out.push_back(static_cast<int32_t>(s));
  }
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

namespace {

class nats_plan final : public head_plan {
 public:
  explicit nats_plan(int64_t window) : window_(window) {}
  std::string name() const override { return "nats"; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    int64_t newest_global = -1;
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s)
      if (hs.live(s) && hs.token_class(s) == kNatsGlobal) newest_global = std::max<int64_t>(newest_global, hs.ord(s));
    const int64_t appended = hs.appended();
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s) {
      if (!hs.live(s)) continue;
      const int64_t o = hs.ord(s);
      const uint8_t t = hs.token_class(s);
      if ((t == kNatsLocal && o < newest_global) || (t == kNatsSliding && appended - o >= window_))
        out.push_back(static_cast<int32_t>(s));
    }
  }

 private:
  int64_t window_;
};

}  // namespace

nats_policy::nats_policy(int64_t window) : window_(window) {
  if (window < 1) fail_value("nats: window must be >= 1, got " + std::to_string(window));
  plan_ = std::make_shared<const nats_plan>(window);
}

std::string nats_policy::name() const { return "nats(window=" + std::to_string(window_) + ")"; }

std::shared_ptr<const head_plan> nats_policy::plan_head(const head_key&, const head_store&, const prompt_stats*) const {
  return plan_;
}

}  // namespace kvloom
