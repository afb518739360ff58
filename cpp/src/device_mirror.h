// Internal: a head store's device mirror (CUDA caches). The kernels on a CUDA device read each
// head's block table and slot metadata from device arrays that mirror the host metadata
// (head_store.h): before a kernel reads a store, the backend uploads only the table entries
// that changed since its last upload, which the cache marks with head_store::touch. A store's
// mirror belongs to that store alone: copying a store (a fork) gives the copy none, so its first
// use uploads it whole.
#pragma once

namespace kvloom {
namespace detail {

struct mirror_state;                   // defined by the CUDA backend
void mirror_release(mirror_state* m);  // frees its device arrays (stream-ordered)

class mirror_handle {
 public:
  mirror_handle() = default;
  mirror_handle(const mirror_handle&) {}
  mirror_handle& operator=(const mirror_handle& o) {
    if (this != &o) reset();
    return *this;
  }
  mirror_handle(mirror_handle&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  mirror_handle& operator=(mirror_handle&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  ~mirror_handle() { reset(); }
  mirror_state* get() const { return p_; }
  void set(mirror_state* p) {
    reset();
    p_ = p;
  }
  void reset() {
    if (p_) mirror_release(p_);
    p_ = nullptr;
  }

 private:
  mirror_state* p_ = nullptr;
};

}  // namespace detail
}  // namespace kvloom
