// kvloom/device.h — devices and streams.
//
// A block pool lives on one device (the host, or one CUDA device); caches on it take tensors
// on that device. CUDA work is issued on the calling thread's current stream, which starts as
// the legacy default stream; set it to the stream your framework uses (e.g. torch's current
// stream) so kvloom's work is ordered with yours and no host synchronisation is needed.
//
// Thread safety: the current stream is per thread.
#pragma once

#include <string>

#include "kvloom/tensor_view.h"

namespace kvloom {

// Whether this build of kvloom has the CUDA backend, and how many CUDA devices the runtime sees
// (0 without a driver or a device).
bool cuda_built();
int cuda_device_count();
// The CUDA architectures compiled in (e.g. "80;90"), or "" without CUDA.
std::string cuda_architectures();
// Whether host block arenas ask for transparent huge pages, and why: "on (...)", "off (...)"
// (KVLOOM_HUGEPAGES=0, or the system's THP setting is never) or "unknown (...)".
std::string host_huge_pages();
// Gives back the memory kvloom keeps between calls on CUDA devices: the pinned host buffers
// for uploads (16 MiB per device used) and the device memory its own stream-ordered pool holds
// for scratch and descriptors (kept, not handed back at each synchronisation). Call it before
// a leak check at exit, or to give the memory back; later calls allocate again. Not while
// another thread may be calling kvloom on a CUDA device. A no-op without CUDA.
void cuda_release_cached_memory();

// The calling thread's current stream (a cudaStream_t as void*; null = legacy default stream).
void set_current_stream(void* stream);
void* current_stream();

// Sets the calling thread's current stream for a scope and restores the previous one.
class stream_guard {
 public:
  explicit stream_guard(void* stream) : saved_(current_stream()) { set_current_stream(stream); }
  ~stream_guard() { set_current_stream(saved_); }
  stream_guard(const stream_guard&) = delete;
  stream_guard& operator=(const stream_guard&) = delete;

 private:
  void* saved_;
};

}  // namespace kvloom
