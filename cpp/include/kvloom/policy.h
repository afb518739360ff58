// kvloom/policy.h — eviction policies.
//
// A policy is consulted once per (layer, kv head, sequence) to choose a head_plan; the
// cache asks the plan, after appends, which slots to free. Policies that profile the
// prompt (FastGen, Task-KV, ...) choose a different plan per head from prompt statistics;
// `full` and `window` use the same plan everywhere. Plans are immutable: everything a
// plan needs to decide (token order, positions, scores) lives in the head_store's slot
// metadata, so forked sequences can share plans.
//
// Thread safety: policies and plans are immutable after construction; any thread may use them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kvloom {

class head_store;
struct prompt_stats;  // prompt statistics collected during prefill (defined by the policies that use them)

struct head_key {
  int layer;
  int head;
  int64_t seq;
};

class head_plan {
 public:
  virtual ~head_plan() = default;
  virtual std::string name() const = 0;
  // Appends to `out` the slots of `hs` that this plan frees now (each a live slot, once).
  virtual void select_evictions(const head_store& hs, std::vector<int32_t>& out) const = 0;
};

class policy {
 public:
  virtual ~policy() = default;
  virtual std::string name() const = 0;
  // The plan for one head. `stats` is null before (or without) prompt profiling.
  virtual std::shared_ptr<const head_plan> plan_head(const head_key& where, const head_store& hs,
                                                     const prompt_stats* stats) const = 0;
};

// Keeps every token.
class full_policy final : public policy {
 public:
  std::string name() const override { return "full"; }
  std::shared_ptr<const head_plan> plan_head(const head_key&, const head_store&, const prompt_stats*) const override;
};

// StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention
// Sinks"): keep the first `sinks` tokens and the most recent `recent` tokens of each head.
class window_policy final : public policy {
 public:
  window_policy(int64_t sinks, int64_t recent);
  std::string name() const override;
  std::shared_ptr<const head_plan> plan_head(const head_key&, const head_store&, const prompt_stats*) const override;
  int64_t sinks() const { return sinks_; }
  int64_t recent() const { return recent_; }

 private:
  int64_t sinks_, recent_;
  std::shared_ptr<const head_plan> plan_;  // one immutable plan serves every head
};

// H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
// Inference of Large Language Models"): keep the `recent` newest tokens plus the heavy
// hitters, the ceil(ratio x tokens seen) older tokens with the largest accumulated
// attention (slot score; see cache::accumulate_attention). Ties keep the older token.
class heavy_hitter_policy final : public policy {
 public:
  heavy_hitter_policy(double ratio, int64_t recent);
  std::string name() const override;
  std::shared_ptr<const head_plan> plan_head(const head_key&, const head_store&, const prompt_stats*) const override;
  double ratio() const { return ratio_; }
  int64_t recent() const { return recent_; }

 private:
  double ratio_;
  int64_t recent_;
  std::shared_ptr<const head_plan> plan_;
};

// FastGen (Ge et al., ICLR 2024, "Model Tells You What to Discard: Adaptive KV Cache
// Compression for LLMs"): each head keeps one of the nested hybrids chosen by profiling its
// prompt attention: level 0 special tokens; 1 + punctuation; 2 + frequent (the
// ceil(r_frequent x tokens seen) with the most accumulated attention); 3 + local (the
// `local_window` newest tokens); 4 everything.
class fastgen_plan final : public head_plan {
 public:
  fastgen_plan(int level, int64_t local_window, double r_frequent);
  std::string name() const override;
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override;
  int level() const { return level_; }

 private:
  int level_;
  int64_t local_window_;
  double r_frequent_;
};

// Keeps the first `sinks` tokens, the `recent` newest, and a fixed sorted set of ords chosen
// when the prompt was profiled (Task-KV's middle activations); keep_all keeps everything
// (Task-KV's heterogeneous heads). `label` names the plan in statistics.
class keep_set_plan final : public head_plan {
 public:
  keep_set_plan(std::string label, int64_t sinks, int64_t recent, std::vector<int32_t> ords, bool keep_all);
  std::string name() const override { return label_; }
  void select_evictions(const head_store& hs, std::vector<int32_t>& out) const override;

 private:
  std::string label_;
  int64_t sinks_, recent_;
  std::vector<int32_t> ords_;  // sorted
  bool keep_all_;
};

// NAtS (Neural Attention Search): each token of each kv head is typed by a learned scorer
// and the type is kept in the slot's class byte: 0 global (kept for every later query),
// 1 local (kept until a newer global token of the head has been attended), 2 sliding
// (kept for the `window` queries from its own on). After each step the plan frees the local
// tokens older than the head's newest global token and the sliding tokens with
// appended - ord >= window. Untyped tokens (class 0) are global.
constexpr uint8_t kNatsGlobal = 0, kNatsLocal = 1, kNatsSliding = 2;

class nats_policy final : public policy {
 public:
  explicit nats_policy(int64_t window);
  std::string name() const override;
  std::shared_ptr<const head_plan> plan_head(const head_key&, const head_store&, const prompt_stats*) const override;
  int64_t window() const { return window_; }

 private:
  int64_t window_;
  std::shared_ptr<const head_plan> plan_;
};

}  // namespace kvloom
