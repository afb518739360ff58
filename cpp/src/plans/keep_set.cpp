// A fixed keep-set: the first `sinks` tokens, the `recent` newest, and a sorted set of ords
// chosen when the prompt was profiled (Task-KV's middle activations); keep_all keeps
// everything (Task-KV's heterogeneous heads). `label` names the plan in statistics. Under a
// byte budget the other heads give way first (oldest first, sinks last), then the keep-all
// heads (oldest first).
#include <algorithm>

#include "plan_impl.h"

namespace kvloom {
namespace {

class keep_set_plan final : public head_plan {
 public:
  keep_set_plan(std::string label, int64_t sinks, int64_t recent, std::vector<int32_t> ords, bool keep_all)
      : label_(std::move(label)), sinks_(sinks), recent_(recent), ords_(std::move(ords)), keep_all_(keep_all) {
    std::sort(ords_.begin(), ords_.end());
  }
  std::string name() const override { return label_; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    if (keep_all_) return;
    const int64_t first_recent = hs.appended() - recent_;
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s) {
      if (!hs.live(s)) continue;
      const int32_t o = hs.ord(s);
      if (o < sinks_ || o >= first_recent || std::binary_search(ords_.begin(), ords_.end(), o)) continue;
      out.push_back(static_cast<int32_t>(s));
    }
  }

  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    const int32_t o = hs.ord(slot);
    return {keep_all_ ? 1 : (o < sinks_ ? 2 : 0), static_cast<double>(o)};
  }

 private:
  std::string label_;
  int64_t sinks_, recent_;
  std::vector<int32_t> ords_;  // sorted
  bool keep_all_;
};

std::shared_ptr<const head_plan> make_keep_set(const plan_params& p) {
  const int64_t sinks = p.integer("sinks", 0), recent = p.integer("recent", 0), keep_all = p.integer("keep_all", 0);
  if (sinks < 0 || recent < 0) fail_value("keep_set: sinks and recent must be >= 0");
  if (keep_all != 0 && keep_all != 1) fail_value("keep_set: keep_all must be 0 or 1");
  std::vector<int32_t> ords = p.list("ords");
  for (int32_t o : ords)
    if (o < 0) fail_value("keep_set: ords must be >= 0, got " + std::to_string(o));
  return std::make_shared<const keep_set_plan>(p.text("label", "keep_set"), sinks, recent, std::move(ords), keep_all == 1);
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(keep_set, "keep_set", "keeps sinks, recent tokens and a fixed set of ords (Task-KV)",
                     kvloom::make_keep_set)
