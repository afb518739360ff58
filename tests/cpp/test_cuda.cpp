// The CUDA backend (built only with KVLOOM_WITH_CUDA), checked against the host backend on the
// same operations: a device pool and cache must hold exactly what a host pool and cache hold
// after appends, copy-on-write forks, rollbacks, evictions and compaction, and decode attention
// must agree within fp32 rounding. Without a device each test says so and passes (CI has no
// GPU; bench/gpu_check.sh runs these under compute-sanitizer on a GPU machine).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cuda_info.h"
#include "helpers.h"
#include "kvloom/attention.h"
#include "kvloom/kvloom.h"
#include "cuda_backend.h"
#include "scores.h"
#include "test.h"

using namespace kvloom;

namespace {

// The larger of a running worst error and a new one; a NaN error stays (std::max would drop it).
float worse(float worst, float err) { return err != err || worst != worst ? std::numeric_limits<float>::quiet_NaN() : std::max(worst, err); }

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
  for (size_t i = 0; i < got.size(); ++i) worst = worse(worst, std::fabs(got[i] - ho[i]));
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
  for (size_t i = 0; i < gd.size(); ++i) worst = worse(worst, std::fabs(gd[i] - hd[i]));
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

// A decode step of an evicting policy changes two table entries that may lie far apart: the
// one the new token fills (the lowest free slot: the last step's hole) and the one it evicts.
// The mirror upload covers those two entries, not the span between them (the simulated build
// also reads every mirror back after each upload).
TEST(cuda_table_uploads_cover_only_changed_entries) {
  if (!have_gpu()) return;
  const int H = 1, D = 32, bs = 8;
  auto hp = std::make_shared<block_pool>(dtype::f32, D, bs, 1024);
  auto dp = std::make_shared<block_pool>(dtype::f32, D, bs, 1024, 0, device_kind::cuda, 0);
  cache h(hp, 1, H), d(dp, 1, H);
  kvtest::lcg rng(3);
  const int64_t s = h.seq_add(), sd = d.seq_add();
  append_both(h, d, 0, s, sd, H, 64 * bs - 3, D, rng);  // 64 entries, the last one not full
  auto q = rng.vec(static_cast<size_t>(2 * D));
  const auto qv = kvtest::view(q.data(), dtype::f32, {1, 2, D});
  dbuf dq(q.data(), q.size() * 4), dout(q.size() * 4);
  const auto out = on_cuda(qv, dout.p);
  const rope_spec none{nullptr, 0};
  const int32_t entries[] = {2, 60, 3, 61};  // where each step's evicted token lives
  std::vector<int32_t> gone = {entries[0] * bs};
  h.evict(0, 0, s, gone.data(), 1);
  d.evict(0, 0, sd, gone.data(), 1);
  decode_attention_cache(d, 0, {{{sd, 0}}}, on_cuda(qv, dq.p), out, 0.f, none);  // the whole table goes up once
  for (int step = 1; step < 4; ++step) {
    append_both(h, d, 0, s, sd, H, 1, D, rng);  // into the lowest free slot: the last step's hole
    gone = {entries[step] * bs + 1};
    h.evict(0, 0, s, gone.data(), 1);
    d.evict(0, 0, sd, gone.data(), 1);
    const int64_t before = detail::cuda_table_upload_words();
    decode_attention_cache(d, 0, {{{sd, 0}}}, on_cuda(qv, dq.p), out, 0.f, none);
    const int64_t words = detail::cuda_table_upload_words() - before;
    CHECK(words > 0);
    CHECK(words <= 2 * (2 + bs));  // two entries: a block address (2 words) and its ords each
  }
  std::vector<float> want(q.size());
  decode_attention_cache(h, 0, {{{s, 0}}}, qv, kvtest::view(want.data(), dtype::f32, {1, 2, D}), 0.f, none);
  const auto got = dout.host<float>();
  for (size_t i = 0; i < want.size(); ++i) CHECK(std::fabs(want[i] - got[i]) < 1e-5f);
}

// The prompt statistics (H2O's accumulated attention, FastGen's hybrid recovery) of a device
// cache equal the host ones: every key-tile shape (head_dim up to 64, 128, 256, 512), query
// groups that do and do not divide a row tile, two batch rows, query chunks after earlier
// tokens (every query sees those), evicted keys, token classes and a local window.
TEST(cuda_prompt_statistics_match_host) {
  if (!have_gpu()) return;
  struct cfg {
    dtype st;
    int D, G, T, Tq;
    double r_frequent;
    int64_t window;
  };
  const cfg cases[] = {{dtype::f32, 32, 1, 70, 37, 0.0, 5},  {dtype::f16, 64, 3, 45, 45, 0.0, 9},
                       {dtype::bf16, 128, 4, 75, 20, 1.0, 4}, {dtype::f32, 80, 2, 40, 40, 0.0, 3},
                       {dtype::bf16, 256, 2, 35, 35, 0.0, 6}, {dtype::f16, 512, 1, 20, 11, 0.0, 2}};
  kvtest::lcg rng(11);
  for (const cfg& cf : cases) {
    const int H = 2, B = 2, Hq = H * cf.G, D = cf.D;
    auto hp = std::make_shared<block_pool>(cf.st, D, 8, 1024);
    auto dp = std::make_shared<block_pool>(cf.st, D, 8, 1024, 0, device_kind::cuda, 0);
    cache h(hp, 1, H), d(dp, 1, H);
    std::vector<int64_t> hs, ds;
    for (int b = 0; b < B; ++b) {
      hs.push_back(h.seq_add());
      ds.push_back(d.seq_add());
      const int64_t n = cf.T - 3 * b;  // rows of different lengths
      auto k = rng.vec(static_cast<size_t>(H * n * D)), v = rng.vec(k.size());
      std::vector<uint8_t> cls(static_cast<size_t>(n));
      for (auto& x : cls) {
        const float u = rng.next();  // about a sixth special, a sixth punctuation
        x = u < -0.66f ? kClassSpecial : u > 0.66f ? kClassPunct : 0;
      }
      const auto kv = kvtest::view(k.data(), dtype::f32, {H, n, D}), vv = kvtest::view(v.data(), dtype::f32, {H, n, D});
      const auto cv = kvtest::view(cls.data(), dtype::u8, {n});
      h.append(0, hs[b], kv, vv, nullptr, &cv);
      dbuf dk(k.data(), k.size() * 4), dv(v.data(), v.size() * 4);
      d.append(0, ds[b], on_cuda(kv, dk.p), on_cuda(vv, dv.p), nullptr, &cv);
      cudaDeviceSynchronize();
      const std::vector<int32_t> gone = {0, 6, static_cast<int32_t>(n / 2)};  // holes in head 1 (token 0 among them: its own query sees no key there)
      h.evict(0, 1, hs[b], gone.data(), 3);
      d.evict(0, 1, ds[b], gone.data(), 3);
    }
    const int Tq = std::min(cf.Tq, cf.T - 3);
    auto q = rng.vec(static_cast<size_t>(B * Hq * Tq * D));
    const auto qv = kvtest::view(q.data(), dtype::f32, {B, Hq, Tq, D});
    dbuf dq(q.data(), q.size() * 4);
    h.accumulate_attention(0, hs, qv, 0.f);
    d.accumulate_attention(0, ds, on_cuda(qv, dq.p), 0.f);
    float worst = 0.f;
    for (int b = 0; b < B; ++b)
      for (int head = 0; head < H; ++head) {
        const auto x = h.live_slots(0, head, hs[b]), y = d.live_slots(0, head, ds[b]);
        CHECK_EQ(x.size(), y.size());
        for (size_t i = 0; i < x.size() && i < y.size(); ++i)
          worst = worse(worst, std::fabs(x[i].score - y[i].score) / (1.f + std::fabs(x[i].score)));
      }
    CHECK(worst < 2e-5f);
    std::vector<double> mh(static_cast<size_t>(B * H * 4)), md(mh.size());
    hybrid_recovery(h, 0, hs, qv, 0.f, cf.r_frequent, cf.window, mh.data());
    hybrid_recovery(d, 0, ds, on_cuda(qv, dq.p), 0.f, cf.r_frequent, cf.window, md.data());
    double worst_mass = 0.0;
    for (size_t i = 0; i < mh.size(); ++i) worst_mass = std::max(worst_mass, std::fabs(mh[i] - md[i]));
    CHECK(worst_mass < 1e-5);
    CHECK(mh[3] > mh[0]);  // (the levels are not all empty: the local window adds mass)
    if (!(worst < 2e-5f && worst_mass < 1e-5))
      std::printf("  D %d G %d: score error %g, mass error %g\n", D, cf.G, static_cast<double>(worst), worst_mass);
    // FastGen's prompt: both statistics from one pass (mode 2 on the device), against the host's
    std::vector<double> fh(mh.size()), fd(mh.size());
    accumulate_with_recovery(h, 0, hs, qv, 0.f, cf.r_frequent, cf.window, fh.data());
    accumulate_with_recovery(d, 0, ds, on_cuda(qv, dq.p), 0.f, cf.r_frequent, cf.window, fd.data());
    float worst2 = 0.f;
    for (int b = 0; b < B; ++b)
      for (int head = 0; head < H; ++head) {
        const auto x = h.live_slots(0, head, hs[b]), y = d.live_slots(0, head, ds[b]);
        for (size_t i = 0; i < x.size() && i < y.size(); ++i)
          worst2 = worse(worst2, std::fabs(x[i].score - y[i].score) / (1.f + std::fabs(x[i].score)));
      }
    double worst_fused = 0.0;
    for (size_t i = 0; i < fh.size(); ++i) worst_fused = std::max(worst_fused, std::fabs(fh[i] - fd[i]));
    CHECK(worst2 < 4e-5f);
    CHECK(worst_fused < 1e-5);
    CHECK(fh[3] > fh[0]);
  }
}

namespace {

// A host cache and a device cache driven by the same operations; attention on the device is
// checked against the host kernels (themselves checked against the Python reference).
struct twin {
  int L, H, D;
  std::shared_ptr<block_pool> hp, dp;
  cache h, d;
  std::vector<std::pair<int64_t, int64_t>> seqs;  // (host id, device id)
  // quant_bits 8, 4 or 2: both caches seal their full blocks into quantized pools
  twin(dtype st, int n_layers, int heads, int head_dim, int bs, std::shared_ptr<const head_plan> plan, int quant_bits = 0)
      : L(n_layers), H(heads), D(head_dim), hp(std::make_shared<block_pool>(st, head_dim, bs, 4096, 7)),
        dp(std::make_shared<block_pool>(st, head_dim, bs, 4096, 7, device_kind::cuda, 0)), h(hp, n_layers, heads, plan),
        d(dp, n_layers, heads, plan) {
    if (quant_bits) {
      h.set_quantized(std::make_shared<block_pool>(st, head_dim, bs, 4096, 7, device_kind::cpu, 0, quant_bits));
      d.set_quantized(std::make_shared<block_pool>(st, head_dim, bs, 4096, 7, device_kind::cuda, 0, quant_bits));
    }
    seqs.push_back({h.seq_add(), d.seq_add()});
  }
};

bool close_or_both_nan(float a, float b, float tol) {
  if (a != a || b != b) return a != a && b != b;
  return std::fabs(a - b) <= tol * (1.f + std::fabs(a));
}

// One random operation on a random sequence of both caches.
void random_op(twin& t, kvtest::lcg& rng, int step) {
  const size_t pick = static_cast<size_t>(step * 7919 + static_cast<int>((rng.next() + 1) * 1000)) % t.seqs.size();
  const auto [sh, sd] = t.seqs[pick];
  const int op = static_cast<int>((rng.next() + 1.f) * 3.f);  // 0..5
  const int64_t len = t.h.seq_length(sh);
  if (op <= 1 || len == 0) {
    const int64_t n = 1 + static_cast<int64_t>((rng.next() + 1.f) * 12.f);
    for (int l = 0; l < t.L; ++l) append_both(t.h, t.d, l, sh, sd, t.H, n, t.D, rng);
  } else if (op == 2 && t.seqs.size() < 4) {
    t.seqs.push_back({t.h.seq_fork(sh), t.d.seq_fork(sd)});
  } else if (op == 3) {
    const int64_t n = std::min<int64_t>(len, 1 + static_cast<int64_t>((rng.next() + 1.f) * 3.f));
    t.h.seq_rollback(sh, n);
    t.d.seq_rollback(sd, n);
  } else if (op == 4) {
    const int layer = step % t.L, head = step % t.H;
    std::vector<int32_t> slots;
    for (const auto& si : t.h.live_slots(layer, head, sh))
      if (rng.next() > 0.4f) slots.push_back(static_cast<int32_t>(si.slot));
    t.h.evict(layer, head, sh, slots.data(), static_cast<int64_t>(slots.size()));
    t.d.evict(layer, head, sd, slots.data(), static_cast<int64_t>(slots.size()));
  } else if (op == 5 && t.seqs.size() > 1) {
    t.h.seq_drop(sh);
    t.d.seq_drop(sd);
    t.seqs.erase(t.seqs.begin() + static_cast<long>(pick));
  } else {
    for (int l = 0; l < t.L; ++l) CHECK_EQ(t.h.apply_policy(l, sh), t.d.apply_policy(l, sd));
  }
}

// Decode attention over every sequence (row b: sequence b; odd rows also see sequence 0 as a
// second segment rotated by a delta) on both caches; returns the worst error.
float decode_both(twin& t, int layer, int Hq, dtype q_type, kvtest::lcg& rng, const rope_spec& rope) {
  const int64_t B = static_cast<int64_t>(t.seqs.size());
  std::vector<std::vector<cache_segment>> hv(B), dv(B);
  for (int64_t b = 0; b < B; ++b) {
    hv[b].push_back({t.seqs[b].first, 0});
    dv[b].push_back({t.seqs[b].second, 0});
    if (b % 2 == 1 && rope.n_freq) {
      hv[b].push_back({t.seqs[0].first, 5 + b});
      dv[b].push_back({t.seqs[0].second, 5 + b});
    }
  }
  const size_t n = static_cast<size_t>(B * Hq * t.D), esz = dtype_size(q_type);
  std::vector<uint8_t> q(n * esz);
  for (size_t i = 0; i < n; ++i) store_from_f32(q.data(), q_type, i, 2.f * rng.next());
  std::vector<float> ho(n);
  const auto qv = kvtest::view(q.data(), q_type, {B, Hq, t.D});
  decode_attention_cache(t.h, layer, hv, qv, kvtest::view(ho.data(), dtype::f32, {B, Hq, t.D}), 0.f, rope);
  dbuf dq(q.data(), q.size()), dout(n * 4);
  decode_attention_cache(t.d, layer, dv, on_cuda(qv, dq.p), on_cuda(kvtest::view(nullptr, dtype::f32, {B, Hq, t.D}), dout.p),
                         0.f, rope);
  const auto got = dout.host<float>();
  float worst = 0.f;
  for (size_t i = 0; i < n; ++i)
    worst = worse(worst, close_or_both_nan(ho[i], got[i], 0.f) ? 0.f : std::fabs(ho[i] - got[i]) / (1.f + std::fabs(ho[i])));
  return worst;
}

// Chunk attention of the last Tq tokens of every sequence, with a random uint8 mask.
float chunk_both(twin& t, int layer, int Hq, int64_t Tq, kvtest::lcg& rng) {
  const int64_t B = static_cast<int64_t>(t.seqs.size());
  std::vector<int64_t> hs, ds;
  int64_t K = 1;
  for (auto [sh, sd] : t.seqs) {
    hs.push_back(sh);
    ds.push_back(sd);
    K = worse(K, t.h.seq_length(sh));
  }
  const size_t n = static_cast<size_t>(B * Hq * Tq * t.D);
  auto q = rng.vec(n);
  std::vector<uint8_t> mask(static_cast<size_t>(B * Tq * K));
  for (auto& m : mask) m = rng.next() > -0.6f;
  std::vector<float> ho(n);
  const auto qv = kvtest::view(q.data(), dtype::f32, {B, Hq, Tq, t.D});
  const auto mv = kvtest::view(mask.data(), dtype::u8, {B, Tq, K});
  chunk_attention_cache(t.h, layer, hs, qv, &mv, kvtest::view(ho.data(), dtype::f32, {B, Hq, Tq, t.D}), 0.f);
  dbuf dq(q.data(), n * 4), dm(mask.data(), mask.size()), dout(n * 4);
  const auto dmv = on_cuda(mv, dm.p);
  chunk_attention_cache(t.d, layer, ds, on_cuda(qv, dq.p), &dmv,
                        on_cuda(kvtest::view(nullptr, dtype::f32, {B, Hq, Tq, t.D}), dout.p), 0.f);
  const auto got = dout.host<float>();
  float worst = 0.f;
  for (size_t i = 0; i < n; ++i) worst = worse(worst, std::fabs(ho[i] - got[i]) / (1.f + std::fabs(ho[i])));
  return worst;
}

// The plans of the random histories: "window" (2 sinks, 20 recent) or "full".
std::shared_ptr<const head_plan> history_plan(const std::string& name) {
  return name == "window" ? make_plan("window", plan_params().set("sinks", 2).set("recent", 20))
                          : make_plan("full", plan_params());
}

// RoPE inverse frequencies for head_dim D (base 10000).
struct rope_table {
  std::vector<float> inv;
  explicit rope_table(int D) : inv(static_cast<size_t>(D / 2)) {
    for (int i = 0; i < D / 2; ++i) inv[i] = std::pow(10000.f, -2.f * i / D);
  }
  rope_spec spec() const { return {inv.data(), static_cast<int>(inv.size())}; }
};

// One step of a random history: a random operation, then decode attention over every
// sequence (q in q_type; RoPE on two steps of three) and chunk attention of the last few
// tokens; the worst errors so far are updated.
void history_step(twin& t, kvtest::lcg& rng, int step, int Hq, dtype q_type, const rope_spec& rope, float& worst_decode,
                  float& worst_chunk) {
  random_op(t, rng, step);
  worst_decode = worse(worst_decode, decode_both(t, step % t.L, Hq, q_type, rng, step % 3 ? rope : rope_spec{}));
  int64_t shortest = INT64_MAX;
  for (auto [sh, sd] : t.seqs) shortest = std::min(shortest, t.h.seq_length(sh));
  if (shortest > 0) worst_chunk = worse(worst_chunk, chunk_both(t, 0, Hq, std::min<int64_t>(shortest, 1 + step % 5), rng));
}

struct kernel_case {
  dtype st;
  int L, H, G, D, bs;
  const char* plan;
};

}  // namespace

// Decode and chunk attention over device caches that went through random appends, forks
// (copy-on-write), rollbacks, evictions, policy runs (compaction) and drops: equal to the host
// kernels after every operation, for every storage dtype and the vector (D 64/128/256) and
// element-wise (other D) kernel shapes, query groups 1..9 (tiles of 1, 4 and 8 query rows),
// several segments with RoPE deltas. In the simulated build every upload of a device block table
// is also read back and compared with the host metadata.
TEST(cuda_attention_over_random_cache_histories) {
  if (!have_gpu()) return;
  const kernel_case cases[] = {
      {dtype::f32, 2, 2, 3, 64, 4, "window"},  {dtype::bf16, 1, 1, 4, 128, 16, "full"},
      {dtype::f16, 1, 2, 1, 80, 8, "window"},  {dtype::f32, 1, 1, 9, 256, 16, "full"},
      {dtype::bf16, 1, 2, 8, 32, 2, "window"}, {dtype::f16, 1, 1, 2, 64, 32, "full"},
  };
  int ci = 0;
  for (const kernel_case& kc : cases) {
    const auto plan = history_plan(kc.plan);
    twin t(kc.st, kc.L, kc.H, kc.D, kc.bs, plan);
    kvtest::lcg rng(100 + ci);
    const rope_table rt(kc.D);
    const rope_spec rope = rt.spec();
    float worst_decode = 0.f, worst_chunk = 0.f;
    for (int step = 0; step < 14; ++step) {
      history_step(t, rng, step, kc.H * kc.G, step % 2 ? dtype::bf16 : dtype::f32, rope, worst_decode, worst_chunk);
      CHECK(same_contents(t.h, t.d, t.seqs[0].first, t.seqs[0].second));
    }
    if (!(worst_decode < 2e-5f && worst_chunk < 2e-5f))
      std::printf("  case %d: worst decode error %g, chunk error %g\n", ci, worst_decode, worst_chunk);
    CHECK(worst_decode < 2e-5f);
    CHECK(worst_chunk < 2e-5f);
    ++ci;
  }
}

// Dense decode attention with rows the vector loads cannot take (an odd token stride) and with
// aligned ones, several segments, and non-finite queries: equal to the host, NaN where it is NaN.
TEST(cuda_dense_attention_strides_and_nonfinite) {
  if (!have_gpu()) return;
  kvtest::lcg rng(23);
  for (int pad : {0, 1}) {
    const int64_t B = 2, Hkv = 2, G = 4, Hq = Hkv * G, D = 64, T0 = 37, T1 = 50, S = D + pad;
    std::vector<float> k0(static_cast<size_t>(B * Hkv * T0 * S)), v0(k0.size()), k1(static_cast<size_t>(B * Hkv * T1 * D)),
        v1(k1.size());
    for (auto* v : {&k0, &v0, &k1, &v1})
      for (auto& x : *v) x = rng.next();
    auto strided = [&](float* p, int64_t T, int64_t stride) {  // [B, Hkv, T, D], token stride `stride`
      tensor_view t = kvtest::view(p, dtype::f32, {B, Hkv, T, D});
      t.strides[2] = stride;
      t.strides[1] = T * stride;
      t.strides[0] = Hkv * T * stride;
      return t;
    };
    auto q = rng.vec(static_cast<size_t>(B * Hq * D));
    q[3] = std::numeric_limits<float>::quiet_NaN();                // row 0, head 0: NaN
    q[static_cast<size_t>(Hq * D + 5 * D)] = std::numeric_limits<float>::infinity();  // row 1, head 5: inf
    const int64_t delta[2] = {0, 11};
    std::vector<float> inv(D / 2);
    for (int i = 0; i < D / 2; ++i) inv[i] = std::pow(10000.f, -2.f * i / D);
    const rope_spec rope{inv.data(), static_cast<int>(D / 2)};
    std::vector<float> ho(q.size());
    const auto qv = kvtest::view(q.data(), dtype::f32, {B, Hq, D});
    decode_attention_dense(qv, {dense_segment{strided(k0.data(), T0, S), strided(v0.data(), T0, S), nullptr},
                                dense_segment{strided(k1.data(), T1, D), strided(v1.data(), T1, D), delta}},
                           kvtest::view(ho.data(), dtype::f32, {B, Hq, D}), 0.f, rope);
    dbuf dk0(k0.data(), k0.size() * 4), dv0(v0.data(), v0.size() * 4), dk1(k1.data(), k1.size() * 4),
        dv1(v1.data(), v1.size() * 4), dq(q.data(), q.size() * 4), dout(q.size() * 4);
    decode_attention_dense(on_cuda(qv, dq.p),
                           {dense_segment{on_cuda(strided(nullptr, T0, S), dk0.p), on_cuda(strided(nullptr, T0, S), dv0.p), nullptr},
                            dense_segment{on_cuda(strided(nullptr, T1, D), dk1.p), on_cuda(strided(nullptr, T1, D), dv1.p), delta}},
                           on_cuda(kvtest::view(nullptr, dtype::f32, {B, Hq, D}), dout.p), 0.f, rope);
    const auto got = dout.host<float>();
    int bad = 0, nans = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      bad += !close_or_both_nan(ho[i], got[i], 2e-5f);
      nans += ho[i] != ho[i];
    }
    CHECK_EQ(bad, 0);
    CHECK(nans >= 2 * D);  // the NaN and inf query heads (the NaN row spans its whole output row)
  }
}

// A head with nothing live (everything evicted) and a sequence with no tokens give zeros, on
// the device as on the host.
TEST(cuda_attention_over_empty_heads_gives_zeros) {
  if (!have_gpu()) return;
  twin t(dtype::f32, 1, 2, 64, 16, nullptr);
  kvtest::lcg rng(3);
  append_both(t.h, t.d, 0, t.seqs[0].first, t.seqs[0].second, 2, 20, 64, rng);
  std::vector<int32_t> all;
  for (const auto& si : t.h.live_slots(0, 1, t.seqs[0].first)) all.push_back(static_cast<int32_t>(si.slot));
  t.h.evict(0, 1, t.seqs[0].first, all.data(), static_cast<int64_t>(all.size()));
  t.d.evict(0, 1, t.seqs[0].second, all.data(), static_cast<int64_t>(all.size()));
  t.seqs.push_back({t.h.seq_add(), t.d.seq_add()});
  CHECK(decode_both(t, 0, 4, dtype::f32, rng, rope_spec{}) < 1e-5f);
  std::vector<float> q(2 * 4 * 64, 0.5f), out(q.size(), 7.f);
  dbuf dq(q.data(), q.size() * 4), dout(q.size() * 4);
  decode_attention_cache(t.d, 0, {{{t.seqs[1].second, 0}}, {{t.seqs[1].second, 0}}},
                         on_cuda(kvtest::view(nullptr, dtype::f32, {2, 4, 64}), dq.p),
                         on_cuda(kvtest::view(nullptr, dtype::f32, {2, 4, 64}), dout.p), 0.f, rope_spec{});
  for (float x : dout.host<float>()) CHECK_EQ(x, 0.f);
}

// Decode attention with the policies' statistic on a device cache: the output equals the host
// kernels' and every live slot's accumulated score the host's (a second pass over the keys on
// the device, the probabilities added on the host), through evictions and a fork.
// H2O on a device cache: each decode step's accumulated attention is read back without
// waiting and queued (one update per layer); whatever reads the scores or changes the slots
// first applies it. Across three layers with updates queued in all of them, the heavy-hitter
// plan evicts the same tokens as on the host, forks (which copy scores) and rollbacks see the
// same scores, and dropping a sequence or destroying the cache with updates still queued
// leaves nothing behind (ASan, memcheck).
TEST(cuda_deferred_scores_apply_before_use) {
  if (!have_gpu()) return;
  const int L = 3, H = 2, D = 64, Hq = 4;
  auto plan = make_plan("heavy_hitter", plan_params().set("ratio", 0.3).set("recent", 6));
  kvtest::lcg rng(17);
  {
    twin t(dtype::f32, L, H, D, 8, plan);
    for (int l = 0; l < L; ++l) append_both(t.h, t.d, l, t.seqs[0].first, t.seqs[0].second, H, 30, D, rng);
    auto decode = [&](int layer) {  // one accumulating decode step of every sequence in `layer`
      const int64_t B = static_cast<int64_t>(t.seqs.size());
      std::vector<int64_t> hs, ds;
      for (auto [a, b] : t.seqs) {
        hs.push_back(a);
        ds.push_back(b);
      }
      auto q = rng.vec(static_cast<size_t>(B * Hq * D));
      for (auto& x : q) x *= 3.f;
      std::vector<float> ho(q.size());
      const auto qv = kvtest::view(q.data(), dtype::f32, {B, Hq, D});
      decode_attention_accumulate(t.h, layer, hs, qv, kvtest::view(ho.data(), dtype::f32, {B, Hq, D}), 0.f);
      dbuf dq(q.data(), q.size() * 4), dout(q.size() * 4);
      decode_attention_accumulate(t.d, layer, ds, on_cuda(qv, dq.p), on_cuda(kvtest::view(nullptr, dtype::f32, {B, Hq, D}), dout.p),
                                  0.f);
    };
    auto same_scores = [&]() {
      bool ok = true;
      for (auto [sh, sd] : t.seqs)
        for (int l = 0; l < L; ++l)
          for (int head = 0; head < H; ++head) {
            const auto a = t.h.live_slots(l, head, sh), b = t.d.live_slots(l, head, sd);
            ok = ok && a.size() == b.size();
            for (size_t i = 0; ok && i < a.size(); ++i)
              ok = a[i].ord == b[i].ord && std::fabs(a[i].score - b[i].score) <= 1e-4f * (1e-3f + std::fabs(a[i].score));
          }
      return ok;
    };
    for (int step = 0; step < 8; ++step) {
      for (int l = 0; l < L; ++l)
        for (auto [sh, sd] : t.seqs) append_both(t.h, t.d, l, sh, sd, H, 1, D, rng);
      for (int l = 0; l < L; ++l) decode(l);  // an update queued in every layer
      if (step == 2) t.seqs.push_back({t.h.seq_fork(t.seqs[0].first), t.d.seq_fork(t.seqs[0].second)});
      if (step == 5) {
        t.h.seq_rollback(t.seqs[1].first, 2);
        t.d.seq_rollback(t.seqs[1].second, 2);
      }
      for (int l = L - 1; l >= 0; --l)  // (the last layer first: each settles only its own)
        for (auto [sh, sd] : t.seqs) CHECK_EQ(t.h.apply_policy(l, sh), t.d.apply_policy(l, sd));
    }
    CHECK(same_scores());
    // a sequence dropped, then the whole cache destroyed, with updates still queued
    for (int l = 0; l < L; ++l) decode(l);
    t.h.seq_drop(t.seqs[1].first);
    t.d.seq_drop(t.seqs[1].second);
    t.seqs.pop_back();
    CHECK(same_scores());
    for (int l = 0; l < L; ++l) decode(l);
  }
}

TEST(cuda_decode_accumulation_matches_host) {
  if (!have_gpu()) return;
  for (int D : {64, 80}) {
    twin t(dtype::f16, 1, 2, D, 8, nullptr);
    kvtest::lcg rng(31 + D);
    const int Hq = 6;
    append_both(t.h, t.d, 0, t.seqs[0].first, t.seqs[0].second, 2, 70, D, rng);
    t.seqs.push_back({t.h.seq_fork(t.seqs[0].first), t.d.seq_fork(t.seqs[0].second)});
    float worst_out = 0.f, worst_score = 0.f;
    for (int step = 0; step < 6; ++step) {
      for (auto [sh, sd] : t.seqs) append_both(t.h, t.d, 0, sh, sd, 2, 1 + step % 3, D, rng);
      if (step == 2) {
        std::vector<int32_t> ev;
        for (const auto& si : t.h.live_slots(0, 1, t.seqs[1].first))
          if (si.ord % 3 == 0) ev.push_back(si.slot);
        t.h.evict(0, 1, t.seqs[1].first, ev.data(), static_cast<int64_t>(ev.size()));
        t.d.evict(0, 1, t.seqs[1].second, ev.data(), static_cast<int64_t>(ev.size()));
      }
      const int64_t B = static_cast<int64_t>(t.seqs.size());
      auto q = rng.vec(static_cast<size_t>(B * Hq * D));
      for (auto& x : q) x *= 3.f;
      std::vector<float> ho(q.size());
      const auto qv = kvtest::view(q.data(), dtype::f32, {B, Hq, D});
      decode_attention_accumulate(t.h, 0, {t.seqs[0].first, t.seqs[1].first}, qv, kvtest::view(ho.data(), dtype::f32, {B, Hq, D}),
                                  0.f);
      dbuf dq(q.data(), q.size() * 4), dout(q.size() * 4);
      decode_attention_accumulate(t.d, 0, {t.seqs[0].second, t.seqs[1].second}, on_cuda(qv, dq.p),
                                  on_cuda(kvtest::view(nullptr, dtype::f32, {B, Hq, D}), dout.p), 0.f);
      const auto got = dout.host<float>();
      for (size_t i = 0; i < got.size(); ++i) worst_out = worse(worst_out, std::fabs(got[i] - ho[i]));
    }
    for (auto [sh, sd] : t.seqs)
      for (int head = 0; head < 2; ++head) {
        const auto a = t.h.live_slots(0, head, sh), b = t.d.live_slots(0, head, sd);
        CHECK_EQ(a.size(), b.size());
        for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
          CHECK_EQ(a[i].ord, b[i].ord);
          worst_score = worse(worst_score, std::fabs(a[i].score - b[i].score) / (1e-3f + std::fabs(a[i].score)));
        }
      }
    if (!(worst_out < 2e-5f && worst_score < 1e-4f)) std::printf("  D %d: output error %g, score error %g\n", D, worst_out, worst_score);
    CHECK(worst_out < 2e-5f);
    CHECK(worst_score < 1e-4f);
  }
}

// A quantized cache on the device (its sealed blocks quantized on the host by quant.cpp and
// uploaded; the kernels read the codes): after random appends, forks, rollbacks, evictions,
// policy runs and drops it holds what the host cache holds (gather dequantizes both the same
// way, so bit for bit), decode and chunk attention equal the host's quantized kernels, and so
// do the prompt statistics; a snapshot of the device cache loads into a host cache unchanged.
TEST(cuda_quantized_cache_matches_host) {
  if (!have_gpu()) return;
  struct qcase {
    dtype st;
    int bits, H, G, D, bs;
    const char* plan;
  };
  const qcase cases[] = {{dtype::f32, 8, 2, 3, 64, 4, "window"}, {dtype::f16, 4, 1, 4, 128, 8, "full"},
                         {dtype::bf16, 2, 2, 2, 32, 4, "window"}, {dtype::f32, 4, 2, 9, 40, 2, "full"},
                         {dtype::f16, 8, 1, 1, 256, 16, "full"}};
  int ci = 0;
  for (const qcase& qc : cases) {
    const auto plan = history_plan(qc.plan);
    twin t(qc.st, 2, qc.H, qc.D, qc.bs, plan, qc.bits);
    kvtest::lcg rng(300 + ci);
    const rope_table rt(qc.D);
    const rope_spec rope = rt.spec();
    float worst_decode = 0.f, worst_chunk = 0.f;
    for (int step = 0; step < 16; ++step) {
      history_step(t, rng, step, qc.H * qc.G, dtype::f32, rope, worst_decode, worst_chunk);
      for (auto [sh, sd] : t.seqs) CHECK(same_contents(t.h, t.d, sh, sd));
      CHECK_EQ(t.h.memory_bytes(), t.d.memory_bytes());
    }
    // the histories sealed blocks (else this test would check nothing quantized)
    int sealed = 0;
    for (int l = 0; l < 2; ++l)
      for (int head = 0; head < qc.H; ++head)
        for (uint8_t x : t.d.sealed_entries(l, head, t.seqs[0].second)) sealed += x;
    CHECK(sealed > 0);
    if (!(worst_decode < 2e-5f && worst_chunk < 2e-5f))
      std::printf("  case %d: worst decode error %g, chunk error %g\n", ci, worst_decode, worst_chunk);
    CHECK(worst_decode < 2e-5f);
    CHECK(worst_chunk < 2e-5f);
    // prompt statistics (from the host's copy of the device keys) equal the host cache's
    const auto [sh, sd] = t.seqs[0];
    const int64_t Tq = std::min<int64_t>(t.h.seq_length(sh), 6), Hq = qc.H * qc.G;
    if (Tq > 0) {
      auto q = rng.vec(static_cast<size_t>(Hq * Tq * qc.D));
      const auto qv = kvtest::view(q.data(), dtype::f32, {1, Hq, Tq, qc.D});
      dbuf dq(q.data(), q.size() * 4);
      t.h.accumulate_attention(1, {sh}, qv, 0.f);
      t.d.accumulate_attention(1, {sd}, on_cuda(qv, dq.p), 0.f);
      std::vector<double> mh(static_cast<size_t>(qc.H) * 4), md(mh.size());
      accumulate_with_recovery(t.h, 0, {sh}, qv, 0.f, 0.0, 3, mh.data());
      accumulate_with_recovery(t.d, 0, {sd}, on_cuda(qv, dq.p), 0.f, 0.0, 3, md.data());
      float worst = 0.f;
      for (int l = 0; l < 2; ++l)
        for (int head = 0; head < qc.H; ++head) {
          const auto x = t.h.live_slots(l, head, sh), y = t.d.live_slots(l, head, sd);
          CHECK_EQ(x.size(), y.size());
          for (size_t i = 0; i < x.size() && i < y.size(); ++i)
            worst = worse(worst, std::fabs(x[i].score - y[i].score) / (1.f + std::fabs(x[i].score)));
        }
      CHECK(worst < 2e-5f);
      for (size_t i = 0; i < mh.size(); ++i) CHECK(std::fabs(mh[i] - md[i]) < 1e-5);
    }
    // a snapshot of the device cache, loaded into a fresh host cache, holds the same tokens
    const auto blob = t.d.export_sequences({sd});
    twin back(qc.st, 2, qc.H, qc.D, qc.bs, plan, qc.bits);
    const auto ids = back.h.import_sequences(blob.data(), blob.size());
    const auto ids_d = back.d.import_sequences(blob.data(), blob.size());
    CHECK(same_contents(back.h, t.d, ids[0], sd));
    CHECK(same_contents(t.h, back.d, sh, ids_d[0]));
    // a device append the format cannot hold (a NaN, beyond fp16) is refused, nothing stored
    const int64_t before = t.d.seq_length(sd);
    const size_t bytes = t.d.memory_bytes();
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), 1e6f}) {
      auto k = rng.vec(static_cast<size_t>(qc.H * 3 * qc.D)), v = rng.vec(k.size());
      v[k.size() - 1] = bad;
      dbuf dk(k.data(), k.size() * 4), dv(v.data(), v.size() * 4);
      const auto kv = kvtest::view(nullptr, dtype::f32, {qc.H, 3, qc.D});
      CHECK_THROWS(t.d.append(0, sd, on_cuda(kv, dk.p), on_cuda(kv, dv.p), nullptr), std::invalid_argument);
    }
    CHECK_EQ(t.d.seq_length(sd), before);
    CHECK_EQ(t.d.memory_bytes(), bytes);
    ++ci;
  }
}
