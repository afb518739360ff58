// Internal: a score update on its way to the host. A CUDA decode step of a policy that ranks
// tokens by accumulated attention (H2O, FastGen) reads the probabilities back asynchronously
// instead of waiting for the GPU in every layer; the cache queues the update
// (cache::defer_scores) and applies it (cache::settle_scores) before any operation reads those
// scores or changes those slots, so what every operation sees is what a synchronous update
// would have left.
#pragma once

namespace kvloom {
namespace detail {

struct deferred_scores {
  int store_layer = 0;  // the layer whose head stores it updates (set by cache::defer_scores)
  virtual ~deferred_scores() = default;  // (an update never applied still waits for its copy)
  // Waits for the probabilities and adds them to the live slots' scores. The caller holds the
  // cache's deferred lock and a use scope that keeps the stores alive.
  virtual void apply() = 0;
};

}  // namespace detail
}  // namespace kvloom
