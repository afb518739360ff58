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
      : label_(std::move(label)), sinks_(sinks), recent_(recent), keep_all_(keep_all) {
    if (!ords.empty()) {  // a bit per ord up to the largest: the per-step test is one load
      kept_.assign(static_cast<size_t>(*std::max_element(ords.begin(), ords.end())) / 64 + 1, 0);
      for (int32_t o : ords) kept_[static_cast<size_t>(o) / 64] |= uint64_t{1} << (o % 64);
    }
  }
  std::string name() const override { return label_; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    if (keep_all_) return;
    // every head of Task-KV's compressed kind runs this at every decode step: no branch on
    // the outcome (data-dependent), no search
    const int64_t first_recent = hs.appended() - recent_, n = hs.n_slots();
    const uint64_t n_bits = kept_.size() * 64;
    size_t m = out.size();
    out.resize(m + static_cast<size_t>(n));
    for (int64_t s = 0; s < n; ++s) {
      const int64_t o = hs.ord(s);  // (any value in a dead slot: the unsigned test keeps it in range)
      const uint64_t u = static_cast<uint64_t>(o);
      const bool listed = u < n_bits && ((kept_[u / 64] >> (u % 64)) & 1);
      const bool keep = !hs.live(s) | (o < sinks_) | (o >= first_recent) | listed;
      out[m] = static_cast<int32_t>(s);
      m += !keep;
    }
    out.resize(m);
  }

  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    const int32_t o = hs.ord(slot);
    return {keep_all_ ? 1 : (o < sinks_ ? 2 : 0), static_cast<double>(o)};
  }

 private:
  std::string label_;
  int64_t sinks_, recent_;
  std::vector<uint64_t> kept_;  // bit o: ord o is one of the listed ords
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
