// The plan registry (make_plan by name, parameter checking) and the C API over the cache.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "helpers.h"
#include "kvloom/c_api.h"
#include "kvloom/kvloom.h"
#include "scores.h"
#include "test.h"

using namespace kvloom;
using kvtest::view;

TEST(plan_registry_lists_and_checks) {
  const std::vector<std::string> names = plan_names();
  for (const char* want : {"fastgen", "full", "heavy_hitter", "keep_set", "nats", "window"})
    CHECK(std::find(names.begin(), names.end(), want) != names.end());
  CHECK_EQ(plan_describe(*make_plan("window", plan_params().set("sinks", 2).set("recent", 8))),
           std::string("window(sinks=2, recent=8)"));
  CHECK_EQ(plan_short_name(*make_plan("fastgen", plan_params().set("level", 1))), std::string("fastgen:special+punct"));
  CHECK_THROWS(make_plan("no_such_plan"), std::invalid_argument);
  CHECK_THROWS(make_plan("window", plan_params().set("recnet", 8)), std::invalid_argument);  // misspelt key
  CHECK_THROWS(make_plan("window", plan_params().set("recent", 2.5)), std::invalid_argument);
  CHECK_THROWS(make_plan("window", plan_params().set("recent", 0)), std::invalid_argument);
  CHECK_THROWS(make_plan("heavy_hitter", plan_params().set("ratio", 1.5)), std::invalid_argument);
  CHECK_THROWS(make_plan("keep_set", plan_params().set("ords", std::vector<int32_t>{-1})), std::invalid_argument);
  try {
    make_plan("window", plan_params().set("recnet", 8));
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("recnet") != std::string::npos);
  }
  CHECK_EQ(std::string(version()), std::string(KVLOOM_VERSION_STRING));
}

// kth_heaviest (the radix select behind H2O's and FastGen's per-step ranking) against a full
// sort: rank keys like the plans build (score bits over inverted ords), heavy ties, all keys
// equal, sizes on both sides of the small-input cut-off, every k at the ends and around the middle.
TEST(kth_heaviest_matches_a_sort) {
  kvtest::lcg rng(11);
  for (int round = 0; round < 400; ++round) {
    const size_t n = 1 + static_cast<size_t>((rng.next() + 1.f) * (round % 4 == 0 ? 30.f : 1200.f));
    const int mode = round % 5;
    std::vector<uint64_t> keys(n);
    for (size_t i = 0; i < n; ++i) {
      const float r = rng.next();
      float score = std::fabs(r) * (mode == 1 ? 1e-3f : 40.f);
      if (mode == 2) score = std::round(score);  // many equal scores (ords still differ)
      uint32_t bits;
      std::memcpy(&bits, &score, 4);
      bits |= 0x80000000u;
      uint64_t key = (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
      if (mode == 3) key = 0x1234;  // all equal
      if (mode == 4) key = static_cast<uint64_t>(std::fabs(r) * 7.f);  // duplicates, low bits only
      keys[i] = key;
    }
    std::vector<uint64_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end(), std::greater<uint64_t>());
    const int64_t N = static_cast<int64_t>(n);
    for (int64_t keep : {int64_t{1}, int64_t{2}, N / 2, N / 2 + 1, N - 1, N}) {
      if (keep < 1 || keep > N) continue;
      std::vector<uint64_t> scratch = keys;
      CHECK_EQ(kth_heaviest(scratch, keep), sorted[static_cast<size_t>(keep - 1)]);
    }
  }
}

// The C API drives the same cache: append, evict by policy, attend, and errors that name
// the problem and change nothing.
TEST(c_api_round_trip_and_errors) {
  const int L = 2, H = 2, D = 8, Hq = 4;
  kvloom_pool* pool = nullptr;
  CHECK_EQ(kvloom_pool_create(KVLOOM_F32, D, 4, 64, &pool), KVLOOM_OK);
  const char* keys[] = {"sinks", "recent"};
  const double vals[] = {1, 4};
  kvloom_cache* c = nullptr;
  CHECK_EQ(kvloom_cache_create(pool, L, H, "window", keys, vals, 2, &c), KVLOOM_OK);
  kvloom_pool_release(pool);  // the cache keeps it alive
  int64_t s = -1;
  CHECK_EQ(kvloom_seq_add(c, &s), KVLOOM_OK);
  kvtest::lcg rng(3);
  for (int l = 0; l < L; ++l) {
    auto k = rng.vec(H * 10 * D), v = rng.vec(H * 10 * D);
    CHECK_EQ(kvloom_append(c, l, s, k.data(), v.data(), KVLOOM_F32, 10), KVLOOM_OK);
    int64_t freed = -1;
    CHECK_EQ(kvloom_apply_policy(c, l, s, &freed), KVLOOM_OK);
    CHECK_EQ(freed, int64_t(H * 5));
  }
  int64_t len = 0;
  CHECK_EQ(kvloom_head_length(c, 1, 1, s, &len), KVLOOM_OK);
  CHECK_EQ(len, int64_t(5));
  // a byte budget: Full would hold 3 blocks per head (1536 bytes a layer), 0.34 of that is 522:
  // from 2 blocks per head down to 1, the oldest token after the sink of each head giving way
  CHECK_EQ(kvloom_cache_set_budget(c, -0.5), KVLOOM_ERR_VALUE);
  CHECK_EQ(kvloom_cache_set_budget(c, 0.34), KVLOOM_OK);
  int64_t freed = -1;
  CHECK_EQ(kvloom_apply_policy(c, 1, s, &freed), KVLOOM_OK);
  CHECK_EQ(freed, int64_t(2));
  CHECK_EQ(kvloom_head_length(c, 1, 1, s, &len), KVLOOM_OK);
  CHECK_EQ(len, int64_t(4));
  CHECK_EQ(kvloom_cache_set_budget(c, 0.0), KVLOOM_OK);
  CHECK_EQ(kvloom_seq_length(c, s, &len), KVLOOM_OK);
  CHECK_EQ(len, int64_t(10));
  auto q = rng.vec(Hq * D);
  std::vector<float> out(Hq * D, -1.f);
  CHECK_EQ(kvloom_attend(c, 1, &s, 1, q.data(), KVLOOM_F32, Hq, out.data(), 0.f), KVLOOM_OK);
  for (float x : out) CHECK(std::isfinite(x) && x != -1.f);
  int64_t f = -1;
  CHECK_EQ(kvloom_seq_fork(c, s, &f), KVLOOM_OK);
  size_t bytes = 0, block = 0;
  CHECK_EQ(kvloom_memory_bytes(c, &bytes), KVLOOM_OK);
  CHECK(bytes > 0);
  // errors: a status, a message naming the problem, nothing changed
  CHECK_EQ(kvloom_head_length(c, 7, 0, s, &len), KVLOOM_ERR_INDEX);
  CHECK(std::string(kvloom_last_error()).find("layer 7") != std::string::npos);
  CHECK_EQ(kvloom_seq_rollback(c, f, 11), KVLOOM_ERR_VALUE);
  CHECK_EQ(kvloom_seq_length(c, f, &len), KVLOOM_OK);
  CHECK_EQ(len, int64_t(10));
  CHECK_EQ(std::string(kvloom_last_error()), std::string(""));
  kvloom_cache* bad = nullptr;
  kvloom_pool* p2 = nullptr;
  CHECK_EQ(kvloom_pool_create(KVLOOM_F32, D, 4, 2, &p2), KVLOOM_OK);
  CHECK_EQ(kvloom_pool_block_bytes(p2, &block), KVLOOM_OK);
  CHECK_EQ(block, size_t(2 * 4 * D * 4));
  CHECK_EQ(kvloom_cache_create(p2, L, H, "windw", nullptr, nullptr, 0, &bad), KVLOOM_ERR_VALUE);
  CHECK(bad == nullptr);
  CHECK_EQ(kvloom_cache_create(p2, L, H, nullptr, nullptr, nullptr, 0, &bad), KVLOOM_OK);
  int64_t t = -1;
  CHECK_EQ(kvloom_seq_add(bad, &t), KVLOOM_OK);
  auto k = rng.vec(H * 9 * D);
  CHECK_EQ(kvloom_append(bad, 0, t, k.data(), k.data(), KVLOOM_F32, 9), KVLOOM_ERR_CAPACITY);  // 6 blocks > 2
  CHECK_EQ(kvloom_seq_length(bad, t, &len), KVLOOM_OK);
  CHECK_EQ(len, int64_t(0));
  CHECK_EQ(kvloom_append(bad, 0, t, k.data(), k.data(), static_cast<kvloom_dtype>(9), 1), KVLOOM_ERR_TYPE);
  CHECK_EQ(kvloom_seq_add(nullptr, &t), KVLOOM_ERR_VALUE);
  kvloom_cache_destroy(bad);
  kvloom_pool_release(p2);
  bool has_window = false;
  for (int i = 0; i < kvloom_policy_count(); ++i) has_window |= std::string(kvloom_policy_name(i)) == "window";
  CHECK(has_window);
  CHECK(kvloom_policy_name(-1) == nullptr);
  kvloom_cache_destroy(c);
}

TEST(c_api_snapshot_export_import) {
  kvloom_pool* pool = nullptr;
  kvloom_cache *c = nullptr, *d = nullptr;
  CHECK_EQ(kvloom_pool_create(KVLOOM_F32, 8, 4, 256, &pool), KVLOOM_OK);
  const char* keys[] = {"sinks", "recent"};
  const double vals[] = {1, 3};
  CHECK_EQ(kvloom_cache_create(pool, 1, 2, "window", keys, vals, 2, &c), KVLOOM_OK);
  CHECK_EQ(kvloom_cache_create(pool, 1, 2, nullptr, nullptr, nullptr, 0, &d), KVLOOM_OK);
  int64_t s = -1;
  CHECK_EQ(kvloom_seq_add(c, &s), KVLOOM_OK);
  std::vector<float> k(2 * 5 * 8, 1.5f);
  CHECK_EQ(kvloom_append(c, 0, s, k.data(), k.data(), KVLOOM_F32, 5), KVLOOM_OK);
  void* blob = nullptr;
  size_t size = 0;
  CHECK_EQ(kvloom_seq_export(c, &s, 1, &blob, &size), KVLOOM_OK);
  int64_t ids[1] = {-1}, count = 0;
  CHECK_EQ(kvloom_seq_import(d, blob, size, 0, ids, 0, &count), KVLOOM_ERR_VALUE);  // no room
  CHECK_EQ(kvloom_seq_import(d, blob, size - 3, 0, ids, 1, &count), KVLOOM_ERR_VALUE);  // truncated
  CHECK(std::string(kvloom_last_error()).find("snapshot") != std::string::npos);
  CHECK_EQ(kvloom_seq_import(d, blob, size, 0, ids, 1, &count), KVLOOM_OK);
  CHECK_EQ(count, int64_t(1));
  int64_t n = 0;
  CHECK_EQ(kvloom_seq_length(d, ids[0], &n), KVLOOM_OK);
  CHECK_EQ(n, int64_t(5));
  kvloom_free(blob);
  kvloom_cache_destroy(c);
  kvloom_cache_destroy(d);
  kvloom_pool_release(pool);
}

// The byte budget (cache::set_budget): threads append to and apply the budget on their own
// forks of one prompt (quantized storage, shared blocks); each fork ends every step within its
// budget, its newest token kept, and every block goes back when the forks are dropped.
TEST(budget_holds_on_concurrent_quantized_forks) {
  constexpr int D = 16, Bs = 4, H = 2;
  auto pool = std::make_shared<block_pool>(dtype::f32, D, Bs, 4096, 16);
  auto qpool = std::make_shared<block_pool>(dtype::f32, D, Bs, 4096, 16, device_kind::cpu, 0, 4);
  cache c(pool, 1, H, make_plan("window", plan_params().set("sinks", 1).set("recent", 1 << 20)));
  c.set_quantized(qpool);
  c.set_budget(0.3);
  CHECK_THROWS(c.set_budget(-1.0), std::invalid_argument);
  auto append = [&](int64_t seq, int64_t n, kvtest::lcg& rng) {
    std::vector<float> k(static_cast<size_t>(H * n * D)), v(k.size());
    for (auto& x : k) x = rng.next();
    for (auto& x : v) x = rng.next();
    c.append(0, seq, view(k.data(), dtype::f32, {H, n, D}), view(v.data(), dtype::f32, {H, n, D}), nullptr);
  };
  auto layer_bytes = [&](int64_t seq) {
    size_t n = 0;
    for (int h = 0; h < H; ++h) {
      const auto table = c.block_table(0, h, seq);
      const auto sealed = c.sealed_entries(0, h, seq);
      for (size_t e = 0; e < table.size(); ++e)
        if (table[e] >= 0) n += sealed[e] ? qpool->block_bytes() : pool->block_bytes();
    }
    return n;
  };
  kvtest::lcg rng(5);
  const int64_t parent = c.seq_add();
  append(parent, 37, rng);
  const int T = 3;
  std::vector<int64_t> kids;
  for (int t = 0; t < T; ++t) kids.push_back(c.seq_fork(parent));
  std::vector<int> bad(T, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < T; ++t)
    threads.emplace_back([&, t] {
      kvtest::lcg local(50 + t);
      for (int m = 0; m < 30; ++m) {
        append(kids[t], 1 + m % 5, local);
        c.apply_policy(0, kids[t]);
        if (layer_bytes(kids[t]) > c.budget_bytes(c.seq_length(kids[t]))) ++bad[t];
        bool newest = false;
        for (const auto& s : c.live_slots(0, 1, kids[t])) newest |= s.ord == c.seq_length(kids[t]) - 1;
        if (!newest) ++bad[t];
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < T; ++t) CHECK_EQ(bad[t], 0);
  CHECK_EQ(c.apply_policy(0, parent, 0) > 0, true);  // Full would hold 0 tokens: down to the floor
  CHECK(layer_bytes(parent) <= c.budget_bytes(0));
  for (int64_t s : c.seq_ids()) c.seq_drop(s);
  CHECK_EQ(pool->used_blocks(), 0);
  CHECK_EQ(qpool->used_blocks(), 0);
}
