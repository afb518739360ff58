// StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention
// Sinks"): keep the first `sinks` tokens and the `recent` newest tokens of each head. Under a
// byte budget the recent window shrinks: the oldest tokens after the sinks first.
#include "plan_impl.h"

namespace kvloom {
namespace {

class window_plan final : public head_plan {
 public:
  window_plan(int64_t sinks, int64_t recent) : sinks_(sinks), recent_(recent) {}
  std::string name() const override { return "window"; }
  std::string describe() const override {
    return "window(sinks=" + std::to_string(sinks_) + ", recent=" + std::to_string(recent_) + ")";
  }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    const int64_t first_recent = hs.appended() - recent_;
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s) {
      if (!hs.live(s)) continue;
      const int64_t o = hs.ord(s);
      if (o >= sinks_ && o < first_recent) out.push_back(static_cast<int32_t>(s));
    }
  }
  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    return {hs.ord(slot) < sinks_ ? 1 : 0, static_cast<double>(hs.ord(slot))};
  }

 private:
  int64_t sinks_, recent_;
};

std::shared_ptr<const head_plan> make_window(const plan_params& p) {
  const int64_t sinks = p.integer("sinks", 4), recent = p.integer("recent", 1024);
  if (sinks < 0) fail_value("window: sinks must be >= 0, got " + std::to_string(sinks));
  if (recent < 1) fail_value("window: recent must be >= 1, got " + std::to_string(recent));
  return std::make_shared<const window_plan>(sinks, recent);
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(window, "window", "keeps `sinks` first and `recent` newest tokens (StreamingLLM)", kvloom::make_window)
