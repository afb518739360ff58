// FastGen (Ge et al., ICLR 2024, "Model Tells You What to Discard: Adaptive KV Cache
// Compression for LLMs"): a head keeps one of the nested hybrids its prompt profiling chose
// (scores.h: hybrid_recovery): level 0 special tokens; 1 + punctuation; 2 + frequent (the
// ceil(r_frequent x tokens seen) with the most accumulated attention); 3 + local (the
// `local_window` newest tokens); 4 everything. Under a byte budget special tokens give way
// last, punctuation next to last, and the other tokens in order of the attention they received
// per query since they arrived (score / (appended - ord)), the least first.
#include "../scores.h"
#include "plan_impl.h"

namespace kvloom {
namespace {

class fastgen_plan final : public head_plan {
 public:
  fastgen_plan(int level, int64_t local_window, double r_frequent)
      : level_(level), local_window_(local_window), r_frequent_(r_frequent) {}
  std::string name() const override {
    static const char* names[] = {"fastgen:special", "fastgen:special+punct", "fastgen:special+punct+frequent",
                                  "fastgen:special+punct+frequent+local", "fastgen:full"};
    return names[level_];
  }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override {
    if (level_ == 4) return;
    std::vector<int64_t> slots;
    for (int64_t s = 0, n = hs.n_slots(); s < n; ++s)
      if (hs.live(s)) slots.push_back(s);
    std::vector<char> freq;
    if (level_ >= 2) freq = top_by_score(hs, slots, r_frequent_, hs.appended());
    const int64_t newest = hs.appended() - 1;
    for (size_t i = 0; i < slots.size(); ++i) {
      const uint8_t c = hs.token_class(slots[i]);
      const bool keep = (c & kClassSpecial) || (level_ >= 1 && (c & kClassPunct)) || (level_ >= 2 && freq[i]) ||
                        (level_ >= 3 && newest - hs.ord(slots[i]) < local_window_);
      if (!keep) out.push_back(static_cast<int32_t>(slots[i]));
    }
  }

  give_way_key give_way(const head_store& hs, int64_t slot) const override {
    const uint8_t c = hs.token_class(slot);
    const int32_t tier = (c & kClassSpecial) ? 2 : (c & kClassPunct) ? 1 : 0;
    return {tier, static_cast<double>(hs.score(slot)) / static_cast<double>(hs.appended() - hs.ord(slot))};
  }

 private:
  int level_;
  int64_t local_window_;
  double r_frequent_;
};

std::shared_ptr<const head_plan> make_fastgen(const plan_params& p) {
  const int64_t level = p.integer("level", 4), local_window = p.integer("local_window", 0);
  const double r_frequent = p.number("r_frequent", 0.3);
  if (level < 0 || level > 4) fail_value("fastgen: hybrid level must be in [0, 4], got " + std::to_string(level));
  if (local_window < 0) fail_value("fastgen: local_window must be >= 0, got " + std::to_string(local_window));
  if (!(r_frequent >= 0.0 && r_frequent <= 1.0)) fail_value("fastgen: r_frequent must be in [0, 1]");
  return std::make_shared<const fastgen_plan>(static_cast<int>(level), local_window, r_frequent);
}

}  // namespace
}  // namespace kvloom

KVLOOM_REGISTER_PLAN(fastgen, "fastgen", "one of FastGen's nested hybrids (level 0..4)", kvloom::make_fastgen)
