// Internal: a small persistent thread pool for the kernels.
//
// parallel_for(n, fn) runs fn(i, worker) for i in [0, n) on the pool's workers plus the
// calling thread, and returns when all are done. Only one parallel_for runs on the pool at
// a time; a caller that finds the pool busy (e.g. several Hogwild workers attending at
// once from their own threads) runs its loop inline instead of waiting.
#pragma once

#include <cstdint>
#include <functional>

namespace kvloom {
namespace detail {

void parallel_for(int64_t n, const std::function<void(int64_t i, int worker)>& fn);
int pool_threads();      // workers including the caller
void pool_resize(int n); // n >= 1

}  // namespace detail
}  // namespace kvloom
