// The host side of the device seam: block memory in host arenas, bytes moved with memcpy and
// the shared fp16/bf16 conversions; the per-thread current stream; CUDA stubs without CUDA.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "device.h"
#include "device_mirror.h"

namespace kvloom {

namespace {

thread_local void* g_stream = nullptr;

constexpr size_t kAlign = 64;
constexpr size_t kHugePage = size_t(2) << 20;

// Transparent huge pages for arena chunks of 2 MiB or more (Linux; KVLOOM_HUGEPAGES=0 turns
// it off): a decode step reads every layer's KV, hundreds of MiB at long contexts, and with
// 4 KiB pages that is a TLB miss every 4 KiB. Where THP is "madvise" (a common default) memory
// only gets huge pages when asked.
bool want_huge_pages() {
  static const bool on = [] {
    const char* e = std::getenv("KVLOOM_HUGEPAGES");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

void* host_arena(size_t bytes) {
#if defined(__linux__)
  if (bytes >= kHugePage && want_huge_pages()) {
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, size);
    if (p) madvise(p, size, MADV_HUGEPAGE);  // advice only: an error leaves ordinary pages
    return p;
  }
#endif
  return std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
}

// Row (h, j) of a [H, n, D] tensor converted into `dst` of dst_type (D elements).
void copy_row_in(void* dst, dtype dst_type, const tensor_view& src, int64_t h, int64_t j, int64_t D) {
  const int64_t idx[3] = {h, j, 0};
  const void* s = src.at(idx);
  const int64_t st = src.strides[2];
  if (src.type == dst_type && st == 1) {
    std::memcpy(dst, s, static_cast<size_t>(D) * dtype_size(dst_type));
    return;
  }
  for (int64_t d = 0; d < D; ++d) store_from_f32(dst, dst_type, d, load_as_f32(s, src.type, d * st));
}

// A block row of src_type into row i of `out` ([rows, D], any float dtype, strided).
void copy_row_out(const tensor_view& out, int64_t i, const void* src, dtype src_type, int64_t D) {
  const int64_t esz = static_cast<int64_t>(dtype_size(out.type));
  char* row = static_cast<char*>(out.data) + i * out.strides[0] * esz;
  if (out.type == src_type && out.strides[1] == 1) {
    std::memcpy(row, src, static_cast<size_t>(D) * dtype_size(src_type));
    return;
  }
  for (int64_t d = 0; d < D; ++d) store_from_f32(row + d * out.strides[1] * esz, out.type, 0, load_as_f32(src, src_type, d));
}

class host_device_ops final : public detail::device_ops {
 public:
  const char* name() const override { return "cpu"; }
  void* arena_alloc(int, size_t bytes) const override { return host_arena(bytes); }
  void arena_free(int, void* p) const override { std::free(p); }
  void copy_spans(int, const std::vector<detail::span_copy>& spans, size_t bytes) const override {
    for (const auto& s : spans) std::memcpy(s.dst, s.src, bytes);
  }
  void write_rows(int, const tensor_view& k, const tensor_view& v, const std::vector<detail::row_write>& rows,
                  dtype dst_type, int64_t D) const override {
    for (const auto& r : rows) {
      copy_row_in(r.k_dst, dst_type, k, r.head, r.token, D);
      copy_row_in(r.v_dst, dst_type, v, r.head, r.token, D);
    }
  }
  void read_rows(int, const std::vector<detail::row_read>& rows, dtype src_type, int64_t D, const tensor_view& k_out,
                 const tensor_view& v_out) const override {
    for (size_t i = 0; i < rows.size(); ++i) {
      copy_row_out(k_out, static_cast<int64_t>(i), rows[i].k_src, src_type, D);
      copy_row_out(v_out, static_cast<int64_t>(i), rows[i].v_src, src_type, D);
    }
  }
  void to_host(int, void* host_dst, const void* src, size_t bytes) const override { std::memcpy(host_dst, src, bytes); }
  void from_host(int, void* dst, const void* host_src, size_t bytes) const override { std::memcpy(dst, host_src, bytes); }
  void rows_to_host_f32(int, const std::vector<const void*>& rows, dtype src_type, int64_t D,
                        float* host_out) const override {
    for (size_t i = 0; i < rows.size(); ++i)
      for (int64_t d = 0; d < D; ++d) host_out[i * D + d] = load_as_f32(rows[i], src_type, static_cast<size_t>(d));
  }
};

}  // namespace

namespace detail {

const device_ops& host_ops() {
  static const host_device_ops ops;
  return ops;
}

const device_ops& ops_for(device_kind kind) {
  if (kind == device_kind::cpu) return host_ops();
  const device_ops* c = cuda_ops();
  if (!c) fail_value("this build of kvloom has no CUDA backend (build with nvcc present, KVLOOM_CUDA=1)");
  return *c;
}

void* current_stream() { return g_stream; }

host_tensor tensor_on_host(const tensor_view& t) {
  host_tensor h{t, {}};
  if (t.device == device_kind::cpu) return h;
  int64_t lo = 0, hi = 0;  // the element offsets spanned, relative to data
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] == 0) return h;  // no element (data is never read)
    (t.strides[d] < 0 ? lo : hi) += (t.shape[d] - 1) * t.strides[d];
  }
  const int64_t esz = static_cast<int64_t>(dtype_size(t.type));
  h.bytes.resize(static_cast<size_t>((hi - lo + 1) * esz));
  ops_for(t.device).to_host(t.device_id, h.bytes.data(), static_cast<const char*>(t.data) + lo * esz, h.bytes.size());
  h.view.data = h.bytes.data() - lo * esz;
  h.view.device = device_kind::cpu;
  return h;
}

#ifndef KVLOOM_WITH_CUDA
const device_ops* cuda_ops() { return nullptr; }
void mirror_release(mirror_state*) {}  // no mirror is ever made without CUDA
#endif

}  // namespace detail

std::string host_huge_pages() {
  if (!want_huge_pages()) return "off (KVLOOM_HUGEPAGES=0)";
#if defined(__linux__)
  std::string mode;
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char buf[128] = {0};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    const std::string line(buf, n);
    const size_t a = line.find('['), b = line.find(']');
    if (a != std::string::npos && b != std::string::npos && b > a) mode = line.substr(a + 1, b - a - 1);
  }
  if (mode == "never") return "off (the system's transparent huge pages setting is never)";
  if (mode == "always" || mode == "madvise")
    return "on (arena chunks of 2 MiB and more; the system's transparent huge pages setting is " + mode + ")";
  return "unknown (no transparent huge pages setting readable)";
#else
  return "off (transparent huge pages are asked for on Linux only)";
#endif
}

void set_current_stream(void* stream) { g_stream = stream; }
void* current_stream() { return g_stream; }

#ifndef KVLOOM_WITH_CUDA
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_architectures() { return ""; }
void cuda_release_cached_memory() {}
#endif

}  // namespace kvloom
