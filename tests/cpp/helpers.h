#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
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

// Naive double-precision decode attention for one batch row: q [Hq, D], k/v [Hkv, T, D].
inline std::vector<double> naive(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                                 int Hq, int Hkv, int T, int D) {
  std::vector<double> out(static_cast<size_t>(Hq * D), 0.0);
  const int G = Hq / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int hq = 0; hq < Hq; ++hq) {
    const int h = hq / G;
    std::vector<double> s(static_cast<size_t>(T));
    double mx = -INFINITY;
    for (int t = 0; t < T; ++t) {
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += double(q[hq * D + d]) * k[(h * T + t) * D + d];
      s[t] = dot * scale;
      mx = std::max(mx, s[t]);
    }
    double z = 0;
    for (int t = 0; t < T; ++t) z += (s[t] = std::exp(s[t] - mx));
    for (int t = 0; t < T; ++t)
      for (int d = 0; d < D; ++d) out[hq * D + d] += s[t] / z * v[(h * T + t) * D + d];
  }
  return out;
}

inline double max_err(const std::vector<float>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
  return e;
}

}  // namespace kvtest
