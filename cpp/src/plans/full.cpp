// Keeps every token.
#include "plan_impl.h"

namespace kvloom {
namespace {

class full_plan final : public head_plan {
 public:
  std::string name() const override { return "full"; }
  void select_evictions(const head_store&, std::vector<int32_t>&) const override {}
};

std::shared_ptr<const head_plan> make_full(const plan_params&) {
  static const auto plan = std::make_shared<const full_plan>();
  return plan;
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(full, "full", "keeps every token", kvloom::make_full)
