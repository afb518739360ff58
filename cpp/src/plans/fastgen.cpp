// FastGen (Ge et al., ICLR 2024, "Model Tells You What to Discard: Adaptive KV Cache
// Compression for LLMs"): a head keeps one of the nested hybrids its prompt profiling chose
// (scores.h: hybrid_recovery): level 0 special tokens; 1 + punctuation; 2 + frequent (the
// ceil(r_frequent x tokens seen) with the most accumulated attention); 3 + local (the
// `local_window` newest tokens); 4 everything. Under a byte budget special tokens give way
// last, punctuation next to last, and the other tokens in order of the attention they received
// per query since they arrived (score / (appended - ord)), the least first.
#include <algorithm>
#include <cmath>

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
    // Runs for every head at every decode step, so: one pass to list the live slots (and
    // their rank keys), one selection, and a keep test without branches (its outcomes are
    // data-dependent and mispredicted as branches).
    thread_local std::vector<int32_t> tl_slots;
    thread_local std::vector<uint64_t> tl_keys;
    std::vector<int32_t>& slots = tl_slots;  // (one thread-local lookup, not one per use)
    std::vector<uint64_t>& keys = tl_keys;
    slots.resize(static_cast<size_t>(hs.n_slots()));
    size_t n = 0;
    for (int64_t s = 0, ns = hs.n_slots(); s < ns; ++s) {
      slots[n] = static_cast<int32_t>(s);
      n += hs.live(s);
    }
    // "frequent": the ceil(r_frequent x tokens seen) live tokens with the most attention
    bool any_frequent = false;
    uint64_t kth = 0;
    if (level_ >= 2) {
      const int64_t keep = std::min<int64_t>(static_cast<int64_t>(n),
                                             static_cast<int64_t>(std::ceil(r_frequent_ * static_cast<double>(hs.appended()))));
      if (keep >= static_cast<int64_t>(n)) return;  // every live token is frequent
      if (keep > 0) {
        any_frequent = true;
        kth = heavy_threshold(hs, slots.data(), n, keep, keys);
      }
    }
    const uint8_t protect = level_ >= 1 ? (kClassSpecial | kClassPunct) : kClassSpecial;
    const int64_t local = level_ >= 3 ? local_window_ : 0;
    const int64_t newest = hs.appended() - 1;
    size_t m = out.size();
    out.resize(m + n);
    for (size_t i = 0; i < n; ++i) {
      const int32_t sl = slots[i];
      const bool keep = ((hs.token_class(sl) & protect) != 0) | (any_frequent && keys[i] >= kth) |
                        (newest - hs.ord(sl) < local);
      out[m] = sl;
      m += !keep;
    }
    out.resize(m);
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
