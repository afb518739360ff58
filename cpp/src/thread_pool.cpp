#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

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
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_items_ = n;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work(int worker) {
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= n_items_) break;
      (*fn_)(i, worker);
    }
  }

  void loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
      }
      work(worker);
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_cv_.notify_one();
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
    quit_ = false;
    for (int w = 1; w < n_threads_; ++w) workers_.emplace_back([this, w] { loop(w); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool quit_ = false;
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
