#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define KVLOOM_PAUSE() _mm_pause()
#else
#define KVLOOM_PAUSE() std::this_thread::yield()
#endif

namespace kvloom {
namespace detail {

namespace {

int default_threads() {
  if (const char* e = std::getenv("KVLOOM_NUM_THREADS")) {
    const int n = std::atoi(e);
    if (n >= 1) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Workers spin briefly for the next job before sleeping: decode calls come in quick
// succession (one per layer), and waking a sleeping thread costs tens of microseconds.
constexpr int kSpinIters = 4000;

class pool {
 public:
  explicit pool(int n) { start(n); }
  ~pool() { stop(); }

  int threads() const { return n_threads_; }

  void resize(int n) {
    std::lock_guard<std::mutex> busy(run_mu_);
    stop();
    start(n);
  }

  void run(int64_t n, const std::function<void(int64_t, int)>& fn) {
    if (owner_pid_ != getpid()) after_fork();
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || n_threads_ == 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i, busy.owns_lock() ? 0 : -1);
      return;
    }
    fn_ = &fn;
    n_items_ = n;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kSpinIters) KVLOOM_PAUSE();
      else std::this_thread::yield();
    }
    fn_ = nullptr;
  }

 private:
  void work(int worker) {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items_) break;
      (*fn_)(i, worker);
    }
  }

  // `seen` starts at the generation current when the thread was created, not when it
  // first runs: a job posted in between must not be mistaken for an old one.
  void loop(int worker, uint64_t seen) {
    for (;;) {
      for (int s = 0; s < kSpinIters && generation_.load(std::memory_order_acquire) == seen && !quit_.load(); ++s)
        KVLOOM_PAUSE();
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_.load() || generation_.load(std::memory_order_acquire) != seen; });
      }
      if (quit_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      work(worker);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // In a forked child the workers do not exist: forget them (never join) and run inline.
  void after_fork() {
    new std::vector<std::thread>(std::move(workers_));  // leaked on purpose: joining would hang
    workers_.clear();
    n_threads_ = 1;
    owner_pid_ = getpid();
  }

  void start(int n) {
    owner_pid_ = getpid();
    n_threads_ = n < 1 ? 1 : n;
    quit_.store(false);
    const uint64_t g0 = generation_.load(std::memory_order_acquire);
    for (int w = 1; w < n_threads_; ++w) workers_.emplace_back([this, w, g0] { loop(w, g0); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;  // one parallel_for at a time
  std::mutex mu_;      // guards sleeping on cv_
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
  int n_threads_ = 1;
  pid_t owner_pid_ = 0;
};

pool& the_pool() {
  static pool p(default_threads());
  return p;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  the_pool().run(n, fn);
}

int pool_threads() { return the_pool().threads(); }

void pool_resize(int n) { the_pool().resize(n); }

}  // namespace detail
}  // namespace kvloom
