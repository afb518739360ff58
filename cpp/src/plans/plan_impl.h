// Internal: what a plan is, and how a plan file registers itself.
//
// A plan file (cpp/src/plans/<stem>.cpp) defines a head_plan subclass and a factory, and
// registers them with KVLOOM_REGISTER_PLAN(<stem>, "name", "one-line doc", factory). CMake
// lists every file of cpp/src/plans/ and generates the index that make_plan() reads, so a
// new plan is exactly one new file: no table to edit, no declaration to add elsewhere.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "../head_store.h"
#include "kvloom/common.h"
#include "kvloom/plan.h"

namespace kvloom {

class head_plan {
 public:
  virtual ~head_plan() = default;
  // Short name shown per head in statistics ("window", "fastgen:special+punct", ...).
  virtual std::string name() const = 0;
  // The plan and its parameters ("window(sinks=4, recent=1024)"); defaults to name().
  virtual std::string describe() const { return name(); }
  // Appends to `out` the live slots of `hs` this plan frees now (each at most once).
  virtual void select_evictions(const head_store& hs, std::vector<int32_t>& out) const = 0;
  // The budget rule's key of live slot `slot` (see give_way_key in kvloom/plan.h); keys are
  // compared across the heads of a layer. Default: the oldest token first.
  virtual give_way_key give_way(const head_store& hs, int64_t slot) const { return {0, static_cast<double>(hs.ord(slot))}; }

 private:
  // What make_plan made it from (snapshots re-make plans from these).
  friend std::shared_ptr<const head_plan> make_plan(const std::string&, const plan_params&);
  friend const std::string& plan_origin_name(const head_plan&);
  friend const plan_params& plan_origin_params(const head_plan&);
  std::string origin_name_;
  plan_params origin_params_;
};

namespace detail {

using plan_factory = std::shared_ptr<const head_plan> (*)(const plan_params&);

struct plan_entry {
  const char* name;
  const char* doc;
  plan_factory make;
};

// The generated index: every plan file's entry, null-terminated.
extern const plan_entry* const kPlanIndex[];

}  // namespace detail
}  // namespace kvloom

// `stem` must be the file's name without .cpp (the generated index refers to it).
#define KVLOOM_REGISTER_PLAN(stem, name, doc, factory) \
  namespace kvloom {                                    \
  namespace detail {                                    \
  extern const plan_entry plan_entry_##stem;            \
  const plan_entry plan_entry_##stem{name, doc, factory}; \
  }                                                     \
  }
