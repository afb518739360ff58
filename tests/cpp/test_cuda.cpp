// The CUDA backend (built only with KVLOOM_WITH_CUDA), checked against the host backend on the
// same operations: a device pool and cache must hold exactly what a host pool and cache hold
// after appends, copy-on-write forks, rollbacks, evictions and compaction, and decode attention
// must agree within fp32 rounding. Without a device each test says so and passes (CI has no
// GPU; bench/gpu_check.sh runs these under compute-sanitizer on a GPU machine).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda_info.h"
#include "helpers.h"
#include "kvloom/attention.h"
#include "kvloom/kvloom.h"
#include "test.h"

using namespace kvloom;

namespace {

bool have_gpu() {
  if (cuda_device_count() > 0) return true;
  std::printf("  (no CUDA device: skipped)\n");
  return false;
}

// A device buffer holding a copy of host floats (freed with the object).
struct dbuf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit dbuf(size_t n_bytes) : bytes(n_bytes) { cudaMalloc(&p, bytes ? bytes : 1); }
  dbuf(const void* host, size_t n_bytes) : dbuf(n_bytes) { cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice); }
  ~dbuf() { cudaFree(p); }
  template <class T>
  std::vector<T> host() const {
    cudaDeviceSynchronize();
    std::vector<T> out(bytes / sizeof(T));
    cudaMemcpy(out.data(), p, bytes, cudaMemcpyDeviceToHost);
    return out;
  }
};

tensor_view on_cuda(tensor_view v, void* data) {
  v.data = data;
  v.device = device_kind::cuda;
  v.device_id = 0;
  return v;
}

void append_both(cache& h, cache& d, int layer, int64_t seq_h, int64_t seq_d, int H, int64_t n, int D, kvtest::lcg& rng) {
  auto k = rng.vec(static_cast<size_t>(H * n * D)), v = rng.vec(k.size());
  const auto kv = kvtest::view(k.data(), dtype::f32, {H, n, D}), vv = kvtest::view(v.data(), dtype::f32, {H, n, D});
  h.append(layer, seq_h, kv, vv, nullptr);
  dbuf dk(k.data(), k.size() * 4), dv(v.data(), v.size() * 4);
  d.append(layer, seq_d, on_cuda(kv, dk.p), on_cuda(vv, dv.p), nullptr);
  cudaDeviceSynchronize();
}

// Host and device caches hold the same tokens (values, ords, positions) in every head.
bool same_contents(const cache& h, const cache& d, int64_t sh, int64_t sd) {
  bool ok = true;
  for (int l = 0; l < h.n_layers(); ++l)
    for (int head = 0; head < h.n_kv_heads(); ++head) {
      const int64_t L = h.length(l, head, sh), D = h.head_dim();
      if (d.length(l, head, sd) != L) return false;
      std::vector<float> hk(static_cast<size_t>(L * D)), hv(hk.size());
      std::vector<int32_t> ho(static_cast<size_t>(L)), hp(ho.size()), dord(ho.size()), dp(ho.size());
      auto ov = kvtest::view(ho.data(), dtype::i32, {L}), pv = kvtest::view(hp.data(), dtype::i32, {L});
      h.gather(l, head, sh, kvtest::view(hk.data(), dtype::f32, {L, D}), kvtest::view(hv.data(), dtype::f32, {L, D}), &ov, &pv);
      dbuf dk(hk.size() * 4), dv(hv.size() * 4);
      auto dov = kvtest::view(dord.data(), dtype::i32, {L}), dpv = kvtest::view(dp.data(), dtype::i32, {L});
      d.gather(l, head, sd, on_cuda(kvtest::view(nullptr, dtype::f32, {L, D}), dk.p),
               on_cuda(kvtest::view(nullptr, dtype::f32, {L, D}), dv.p), &dov, &dpv);
      ok = ok && dk.host<float>() == hk && dv.host<float>() == hv && dord == ho && dp == hp;
    }
  return ok;
}

}  // namespace

TEST(cuda_bf16_widening_matches_host) {
  if (!have_gpu()) return;
  const int n = 1 << 16;
  std::vector<uint16_t> in(n);
  for (int i = 0; i < n; ++i) in[i] = static_cast<uint16_t>(i);  // every bf16 bit pattern
  std::vector<float> dev(n, -1.f);
  CHECK(kvloom::cuda::widen_bf16_on_device(in.data(), dev.data(), n));
  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const float host = kvloom::bf16_to_f32(in[i]);
    if (std::memcmp(&host, &dev[i], sizeof(float)) != 0) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
}

// Appends, a copy-on-write fork, eviction with compaction, rollback: the device cache holds
// bit for bit what the host cache holds (fp32 and fp16 storage).
TEST(cuda_cache_operations_match_host) {
  if (!have_gpu()) return;
  for (dtype st : {dtype::f32, dtype::f16, dtype::bf16}) {
    const int L = 2, H = 2, D = 16, bs = 4;
    auto hp = std::make_shared<block_pool>(st, D, bs, 512, 5);
    auto dp = std::make_shared<block_pool>(st, D, bs, 512, 5, device_kind::cuda, 0);
    auto plan = make_plan("window", plan_params().set("sinks", 2).set("recent", 9));
    cache h(hp, L, H, plan), d(dp, L, H, plan);
    kvtest::lcg rng(7);
    const int64_t a = h.seq_add(), ad = d.seq_add();
    for (int step = 0; step < 6; ++step)
      for (int l = 0; l < L; ++l) {
        append_both(h, d, l, a, ad, H, 1 + (step * 3) % 5, D, rng);
        CHECK_EQ(h.apply_policy(l, a), d.apply_policy(l, ad));
      }
    CHECK(same_contents(h, d, a, ad));
    const int64_t f = h.seq_fork(a), fd = d.seq_fork(ad);
    for (int l = 0; l < L; ++l) append_both(h, d, l, f, fd, H, 3, D, rng);  // copy-on-write of shared tail blocks
    CHECK(same_contents(h, d, a, ad));
    CHECK(same_contents(h, d, f, fd));
    h.seq_rollback(f, 2);
    d.seq_rollback(fd, 2);
    std::vector<int32_t> ev = {0};
    h.evict(0, 1, f, ev.data(), 1);
    d.evict(0, 1, fd, ev.data(), 1);
    CHECK(same_contents(h, d, f, fd));
    CHECK_EQ(h.memory_bytes(), d.memory_bytes());
    h.seq_drop(a);
    d.seq_drop(ad);
    for (int l = 0; l < L; ++l) {  // the fork's blocks are exclusive now: compaction moves rows on the device
      h.apply_policy(l, f);
      d.apply_policy(l, fd);
    }
    CHECK(same_contents(h, d, f, fd));
    CHECK_EQ(h.blocks_held(), d.blocks_held());
  }
}

// Decode attention on the device against the host kernels: GQA over the cache (with a
// partially evicted head, two segments with a RoPE delta) and dense.
TEST(cuda_decode_attention_matches_host) {
  if (!have_gpu()) return;
  const int H = 2, Hq = 8, D = 64, bs = 16;
  auto hp = std::make_shared<block_pool>(dtype::f16, D, bs, 4096);
  auto dp = std::make_shared<block_pool>(dtype::f16, D, bs, 4096, 0, device_kind::cuda, 0);
  cache h(hp, 1, H), d(dp, 1, H);
  kvtest::lcg rng(11);
  const int64_t s0 = h.seq_add(), s0d = d.seq_add(), s1 = h.seq_add(), s1d = d.seq_add();
  append_both(h, d, 0, s0, s0d, H, 700, D, rng);
  append_both(h, d, 0, s1, s1d, H, 45, D, rng);
  std::vector<int32_t> ev;
  for (int i = 3; i < 200; i += 3) ev.push_back(i);
  h.evict(0, 1, s0, ev.data(), static_cast<int64_t>(ev.size()));
  d.evict(0, 1, s0d, ev.data(), static_cast<int64_t>(ev.size()));
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[i] = std::pow(10000.f, -2.f * i / D);
  const rope_spec rope{inv.data(), D / 2};
  auto q = rng.vec(2 * Hq * D);
  std::vector<float> ho(q.size());
  const auto qv = kvtest::view(q.data(), dtype::f32, {2, Hq, D});
  const std::vector<std::vector<cache_segment>> hviews = {{{s0, 0}}, {{s0, 0}, {s1, 37}}};
  const std::vector<std::vector<cache_segment>> dviews = {{{s0d, 0}}, {{s0d, 0}, {s1d, 37}}};
  decode_attention_cache(h, 0, hviews, qv, kvtest::view(ho.data(), dtype::f32, {2, Hq, D}), 0.f, rope);
  dbuf dq(q.data(), q.size() * 4), dout(q.size() * 4);
  decode_attention_cache(d, 0, dviews, on_cuda(qv, dq.p), on_cuda(kvtest::view(nullptr, dtype::f32, {2, Hq, D}), dout.p),
                         0.f, rope);
  auto got = dout.host<float>();
  float worst = 0.f;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - ho[i]));
  CHECK(worst < 2e-4f);
  // dense: q [1, Hq, D] over k, v [1, H, T, D] in bf16
  const int64_t T = 999;
  std::vector<uint16_t> kb(static_cast<size_t>(H * T * D)), vb(kb.size());
  for (auto& x : kb) x = f32_to_bf16(rng.next());
  for (auto& x : vb) x = f32_to_bf16(rng.next());
  const auto kview = kvtest::view(kb.data(), dtype::bf16, {1, H, T, D}), vview = kvtest::view(vb.data(), dtype::bf16, {1, H, T, D});
  std::vector<float> hd(static_cast<size_t>(Hq * D));
  decode_attention_dense(kvtest::view(q.data(), dtype::f32, {1, Hq, D}), {dense_segment{kview, vview, nullptr}},
                         kvtest::view(hd.data(), dtype::f32, {1, Hq, D}), 0.f, rope_spec{});
  dbuf dk(kb.data(), kb.size() * 2), dv(vb.data(), vb.size() * 2), dq1(q.data(), hd.size() * 4), dd(hd.size() * 4);
  decode_attention_dense(on_cuda(kvtest::view(nullptr, dtype::f32, {1, Hq, D}), dq1.p),
                         {dense_segment{on_cuda(kview, dk.p), on_cuda(vview, dv.p), nullptr}},
                         on_cuda(kvtest::view(nullptr, dtype::f32, {1, Hq, D}), dd.p), 0.f, rope_spec{});
  auto gd = dd.host<float>();
  worst = 0.f;
  for (size_t i = 0; i < gd.size(); ++i) worst = std::max(worst, std::fabs(gd[i] - hd[i]));
  CHECK(worst < 2e-4f);
}

// Prompt statistics on a device cache (computed on the host from the device keys) equal the
// host cache's; a CUDA tensor given to a host cache, or a host one to a device cache, is refused.
TEST(cuda_statistics_and_device_checks) {
  if (!have_gpu()) return;
  const int H = 2, Hq = 4, D = 32;
  auto hp = std::make_shared<block_pool>(dtype::f32, D, 8, 1024);
  auto dp = std::make_shared<block_pool>(dtype::f32, D, 8, 1024, 0, device_kind::cuda, 0);
  cache h(hp, 1, H), d(dp, 1, H);
  kvtest::lcg rng(5);
  const int64_t s = h.seq_add(), sd = d.seq_add();
  append_both(h, d, 0, s, sd, H, 50, D, rng);
  auto q = rng.vec(Hq * 10 * D);
  const auto qv = kvtest::view(q.data(), dtype::f32, {1, Hq, 10, D});
  dbuf dq(q.data(), q.size() * 4);
  h.accumulate_attention(0, {s}, qv, 0.f);
  d.accumulate_attention(0, {sd}, on_cuda(qv, dq.p), 0.f);
  for (int head = 0; head < H; ++head) {
    const auto a = h.live_slots(0, head, s), b = d.live_slots(0, head, sd);
    CHECK_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) CHECK(std::fabs(a[i].score - b[i].score) < 1e-5f);
  }
  std::vector<float> k(static_cast<size_t>(H * D));
  const auto kv = kvtest::view(k.data(), dtype::f32, {H, 1, D});
  CHECK_THROWS(d.append(0, sd, kv, kv, nullptr), std::invalid_argument);            // host tensors, device cache
  dbuf dk(k.data(), k.size() * 4);
  CHECK_THROWS(h.append(0, s, on_cuda(kv, dk.p), on_cuda(kv, dk.p), nullptr), std::invalid_argument);  // and back
  CHECK_EQ(d.seq_length(sd), int64_t(50));
  CHECK_THROWS(block_pool(dtype::f32, D, 8, 16, 0, device_kind::cuda, 99), std::invalid_argument);
}
