#pragma once

#include <cstdint>
#include <atomic>
#include <initializer_list>
#include <thread>
#include <vector>

#include "kvloom/tensor_view.h"

namespace kvtest {

// A contiguous row-major view over caller-owned memory.
inline kvloom::tensor_view view(void* data, kvloom::dtype t, std::initializer_list<int64_t> shape) {
  kvloom::tensor_view v;
  v.data = data;
  v.type = t;
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t st = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = st;
    st *= v.shape[d];
  }
  return v;
}

// Runs fn(t) for t < n on n threads released at once (a spin start, so they overlap), then joins.
template <class Fn>
void run_together(int n, Fn fn) {
  std::atomic<int> go{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t)
    threads.emplace_back([&go, &fn, t] {
      while (go.load() == 0) {
      }
      fn(t);
    });
  go.store(1);
  for (auto& th : threads) th.join();
}

// Deterministic pseudo-random floats in [-1, 1).
struct lcg {
  uint64_t s;
  explicit lcg(uint64_t seed) : s(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  float next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>((s >> 40) & 0xffffff) / static_cast<float>(1 << 23) - 1.0f;
  }
  std::vector<float> vec(size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = next();
    return v;
  }
};

}  // namespace kvtest
