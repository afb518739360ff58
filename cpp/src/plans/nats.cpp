// NAtS (Deng & Lindauer, 2025, "Neural Attention Search"): each token of each kv head is
// typed by a learned scorer and the type is kept in the slot's class byte: 0 global (kept
// for every later query), 1 local (kept until a newer global token of the head has been
// attended), 2 sliding (kept for the `window` queries from its own on). After each step the
// plan frees the local tokens older than the head's newest global token and the sliding
// tokens with appended - ord >= window. Untyped tokens (class 0) are global. Under a byte
// budget sliding tokens give way first, then local, then global ones, each oldest first.
#include <algorithm>

#include "plan_impl.h"

namespace kvloom {
namespace {

class nats_plan final : public head_plan {
 public:
  explicit nats_plan(int64_t window) : window_(window) {}
  std::string name() const override { return "nats"; }
  std::string describe() const override { return "nats(window=" + std::to_string(window_) + ")"; }
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

  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    const uint8_t t = hs.token_class(slot);
    const int32_t tier = t == kNatsSliding ? 0 : t == kNatsLocal ? 1 : 2;
    return {tier, static_cast<double>(hs.ord(slot))};
  }

 private:
  int64_t window_;
};

std::shared_ptr<const head_plan> make_nats(const plan_params& p) {
  const int64_t window = p.integer("window", 64);
  if (window < 1) fail_value("nats: window must be >= 1, got " + std::to_string(window));
  return std::make_shared<const nats_plan>(window);
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(nats, "nats", "NAtS token types: global / local / sliding (class byte)", kvloom::make_nats)
