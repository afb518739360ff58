// kvloom/plan.h — eviction plans, made by name.
//
// A plan decides, after appends, which tokens of one kv head of one sequence to free. A
// cache has a default plan (per layer, optionally) that every head of a new sequence starts
// with; a head's plan can be replaced later (e.g. by the plan FastGen's profiling chose for
// it). Plans are immutable and hold no per-head state: everything they decide from (token
// order, positions, classes, accumulated attention) lives in the cache's slot metadata, so
// one plan object serves any number of heads, sequences and forks.
//
// Plans are made by name from a small parameter map; every plan kvloom ships is listed by
// plan_names():
//   "full"          keeps everything
//   "window"        sinks (default 4), recent (default 1024): StreamingLLM
//   "heavy_hitter"  ratio (default 0.1), recent (default 64): H2O
//   "fastgen"       level (0..4), local_window, r_frequent: one of FastGen's hybrids
//   "keep_set"      sinks, recent, ords (list), keep_all (0/1), label (text): a fixed keep-set (Task-KV)
//   "nats"          window: NAtS token types (global / local / sliding) read from the class byte
// Unknown names and parameters, and out-of-range values, throw std::invalid_argument naming them.
//
// Thread safety: plans are immutable; make_plan may be called from any thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace kvloom {

class head_plan;  // opaque here: made by make_plan, shared read-only by any number of heads

// Token-class bits kept per slot (set on append). FastGen reads these two; NAtS stores its
// token type (0 global, 1 local, 2 sliding) in the same byte.
constexpr uint8_t kClassSpecial = 1;  // the tokenizer's special tokens
constexpr uint8_t kClassPunct = 2;    // tokens made only of punctuation and whitespace
constexpr uint8_t kNatsGlobal = 0, kNatsLocal = 1, kNatsSliding = 2;

// The budget rule (cache::set_budget): when a layer of a sequence holds more bytes than its
// budget, live tokens of all its heads give way in increasing key order: tier first, then
// value, then ord (older first), then head and slot. Each plan states its rule by the keys it
// gives (plans/*.cpp); tier kNeverGivesWay is never taken (the cache gives it to each head's
// newest token).
struct give_way_key {
  int32_t tier;
  double value;
};
constexpr int32_t kNeverGivesWay = 0x7fffffff;

// Parameters of a plan: numbers, integer lists and text by key.
class plan_params {
 public:
  plan_params& set(const std::string& key, double value);
  plan_params& set(const std::string& key, std::vector<int32_t> values);
  plan_params& set(const std::string& key, std::string text);

  // Readers used by the plan factories. Each marks its key as used; a missing key gives the
  // fallback. integer() rejects non-integral numbers.
  double number(const std::string& key, double fallback) const;
  int64_t integer(const std::string& key, int64_t fallback) const;
  std::vector<int32_t> list(const std::string& key) const;
  std::string text(const std::string& key, const std::string& fallback) const;
  // Throws std::invalid_argument naming the first key no reader asked for.
  void check_all_used(const std::string& plan) const;

  // Everything set, by kind (snapshots write these to re-make a plan).
  const std::map<std::string, double>& numbers() const { return numbers_; }
  const std::map<std::string, std::vector<int32_t>>& lists() const { return lists_; }
  const std::map<std::string, std::string>& texts() const { return texts_; }

 private:
  std::map<std::string, double> numbers_;
  std::map<std::string, std::vector<int32_t>> lists_;
  std::map<std::string, std::string> texts_;
  mutable std::vector<std::string> used_;
};

// A plan by name (see above). Throws std::invalid_argument for an unknown name or parameter.
std::shared_ptr<const head_plan> make_plan(const std::string& name, const plan_params& params = plan_params());
// Every plan name make_plan accepts, sorted.
std::vector<std::string> plan_names();
// "window(sinks=4, recent=1024)": the plan and its parameters.
std::string plan_describe(const head_plan& plan);
// "window": the short name shown per head in statistics (FastGen: the chosen hybrid).
std::string plan_short_name(const head_plan& plan);
// The name and parameters make_plan made `plan` from (make_plan(name, params) makes an equal one).
const std::string& plan_origin_name(const head_plan& plan);
const plan_params& plan_origin_params(const head_plan& plan);

}  // namespace kvloom
