// Keeps every token. Under a byte budget it gives way like StreamingLLM: the oldest tokens
// after the first 4 (attention sinks) first.
#include "plan_impl.h"

namespace kvloom {
namespace {

class full_plan final : public head_plan {
 public:
  std::string name() const override { return "full"; }
  void select_evictions(const head_store&, std::vector<int32_t>&) const override {}
  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    return {hs.ord(slot) < 4 ? 1 : 0, static_cast<double>(hs.ord(slot))};
  }
};

std::shared_ptr<const head_plan> make_full(const plan_params&) {
  static const auto plan = std::make_shared<const full_plan>();
  return plan;
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(full, "full", "keeps every token", kvloom::make_full)
