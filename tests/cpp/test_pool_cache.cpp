#include <algorithm>
#include <cmath>
#include <atomic>
#include <memory>
#include <numeric>
#include <set>
#include <mutex>
#include <thread>
#include <vector>

#include "head_store.h"
#include "helpers.h"
#include "kvloom/block_pool.h"
#include "kvloom/cache.h"
#include "kvloom/attention.h"
#include "kvloom/plan.h"
#include "test.h"

using namespace kvloom;
using kvtest::view;

namespace {

std::shared_ptr<block_pool> small_pool(int64_t cap, int bs = 4, int D = 8) {
  return std::make_shared<block_pool>(dtype::f32, D, bs, cap, 3);
}

// Appends n tokens whose every feature equals `value + token index` to all heads of a layer.
void append_const(cache& c, int layer, int64_t seq, int64_t n, float value) {
  const int H = c.n_kv_heads(), D = c.head_dim();
  std::vector<float> k(static_cast<size_t>(H * n * D)), v(k.size());
  for (int h = 0; h < H; ++h)
    for (int64_t j = 0; j < n; ++j)
      for (int d = 0; d < D; ++d) {
        k[(h * n + j) * D + d] = value + static_cast<float>(j);
        v[(h * n + j) * D + d] = -(value + static_cast<float>(j));
      }
  c.append(layer, seq, view(k.data(), dtype::f32, {H, n, D}), view(v.data(), dtype::f32, {H, n, D}), nullptr);
}

std::vector<float> gather_keys(const cache& c, int layer, int head, int64_t seq) {
  const int64_t L = c.length(layer, head, seq);
  std::vector<float> k(static_cast<size_t>(L * c.head_dim())), v(k.size());
  c.gather(layer, head, seq, view(k.data(), dtype::f32, {L, c.head_dim()}), view(v.data(), dtype::f32, {L, c.head_dim()}),
           nullptr, nullptr);
  return k;
}

}  // namespace

TEST(pool_alloc_free_refcount) {
  block_pool p(dtype::f16, 64, 16, 10, 4);
  CHECK_EQ(p.block_bytes(), size_t(2 * 16 * 64 * 2));
  std::vector<block_id> ids(7);
  p.alloc(7, ids.data());
  CHECK_EQ(p.used_blocks(), 7);
  CHECK(p.reserved_bytes() >= 7 * p.block_bytes());
  std::set<block_id> uniq(ids.begin(), ids.end());
  CHECK_EQ(uniq.size(), size_t(7));
  // block memory is distinct and writable
  std::set<void*> ptrs;
  for (block_id b : ids) {
    ptrs.insert(p.block_keys(b));
    std::fill_n(static_cast<char*>(p.block_keys(b)), p.block_bytes(), char(1));
  }
  CHECK_EQ(ptrs.size(), size_t(7));
  p.incref(ids[0]);
  CHECK_EQ(p.refcount(ids[0]), 2);
  p.decref(ids[0]);
  CHECK_EQ(p.refcount(ids[0]), 1);
  std::vector<block_id> more(4);
  CHECK_THROWS(p.alloc(4, more.data()), capacity_error);  // 3 left: all or nothing
  CHECK_EQ(p.used_blocks(), 7);
  p.decref_many(ids.data(), ids.size());
  CHECK_EQ(p.used_blocks(), 0);
  p.alloc(10, std::vector<block_id>(10).data());
  CHECK_EQ(p.free_blocks(), 0);
  CHECK_THROWS(p.decref(99), std::out_of_range);
}

TEST(pool_rejects_bad_construction) {
  CHECK_THROWS(block_pool(dtype::i32, 8, 4, 4), type_error);
  CHECK_THROWS(block_pool(dtype::f32, 0, 4, 4), std::invalid_argument);
  CHECK_THROWS(block_pool(dtype::f32, 8, 0, 4), std::invalid_argument);
  CHECK_THROWS(block_pool(dtype::f32, 8, 4, 0), std::invalid_argument);
}

TEST(cache_append_fork_cow_rollback_drop) {
  auto pool = small_pool(64);
  cache c(pool, 1, 2, nullptr);
  const int64_t a = c.seq_add();
  append_const(c, 0, a, 6, 0.f);  // 2 blocks per head
  CHECK_EQ(c.blocks_held(), 4);
  const int64_t b = c.seq_fork(a);
  CHECK_EQ(c.blocks_held(), 4);
  for (block_id id : c.store(0, 0, a).table()) CHECK_EQ(pool->refcount(id), 2);
  append_const(c, 0, b, 1, 100.f);  // copy-on-write of the tail block in each head
  CHECK_EQ(c.blocks_held(), 6);
  auto ka = gather_keys(c, 0, 0, a), kb = gather_keys(c, 0, 0, b);
  CHECK_EQ(ka.size(), size_t(6 * 8));
  CHECK_EQ(kb.size(), size_t(7 * 8));
  CHECK(std::equal(ka.begin(), ka.end(), kb.begin()));
  CHECK_EQ(kb[6 * 8], 100.f);
  c.seq_rollback(b, 3);  // b: tokens 0..3 left
  CHECK_EQ(c.length(0, 1, b), 4);
  CHECK_EQ(c.seq_length(b), 4);
  CHECK_EQ(c.length(0, 1, a), 6);
  CHECK_THROWS(c.seq_rollback(b, 5), std::invalid_argument);
  c.seq_drop(a);
  CHECK_THROWS(c.seq_length(a), std::out_of_range);
  c.seq_drop(b);
  CHECK_EQ(pool->used_blocks(), 0);
  CHECK_EQ(c.memory_bytes(), size_t(0));
}

TEST(cache_evict_frees_blocks_and_reuses_slots) {
  auto pool = small_pool(64);
  cache c(pool, 1, 1, nullptr);
  const int64_t s = c.seq_add();
  append_const(c, 0, s, 12, 0.f);  // 3 blocks
  std::vector<int32_t> middle = {4, 5, 6, 7};
  c.evict(0, 0, s, middle.data(), 4);
  CHECK_EQ(c.blocks_held(), 2);  // the middle block returned to the pool
  CHECK_EQ(c.store(0, 0, s).table()[1], -1);
  append_const(c, 0, s, 2, 50.f);  // fills the hole first
  CHECK_EQ(c.blocks_held(), 3);
  CHECK_EQ(c.store(0, 0, s).ord(4), 12);
  std::vector<int32_t> bad = {0, 0};
  CHECK_THROWS(c.evict(0, 0, s, bad.data(), 2), std::invalid_argument);
  std::vector<int32_t> dead = {6};
  CHECK_THROWS(c.evict(0, 0, s, dead.data(), 1), std::out_of_range);
  CHECK_EQ(c.length(0, 0, s), 10);
}

TEST(cache_capacity_error_changes_nothing) {
  auto pool = small_pool(5);
  cache c(pool, 1, 2, nullptr);
  const int64_t s = c.seq_add();
  append_const(c, 0, s, 7, 0.f);  // 4 blocks
  const auto before = gather_keys(c, 0, 1, s);
  CHECK_THROWS(append_const(c, 0, s, 5, 9.f), capacity_error);  // needs 2 more blocks per... 1 free
  CHECK_EQ(pool->used_blocks(), 4);
  CHECK_EQ(c.seq_length(s), 7);
  CHECK(gather_keys(c, 0, 1, s) == before);
  append_const(c, 0, s, 1, 9.f);  // fills the free slot of each tail: no block needed
  CHECK_EQ(pool->used_blocks(), 4);
}

TEST(window_policy_keeps_sinks_and_recent) {
  auto pool = small_pool(256);
  cache c(pool, 1, 1, make_plan("window", plan_params().set("sinks", 2).set("recent", 5)));
  const int64_t s = c.seq_add();
  for (int i = 0; i < 40; ++i) {
    append_const(c, 0, s, 1, static_cast<float>(i));
    c.apply_policy(0, s);
  }
  const head_store& hs = c.store(0, 0, s);
  std::vector<int32_t> ords;
  for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
    if (hs.live(sl)) ords.push_back(hs.ord(sl));
  std::sort(ords.begin(), ords.end());
  CHECK((ords == std::vector<int32_t>{0, 1, 35, 36, 37, 38, 39}));
  CHECK(c.blocks_held() <= 3);
}

// Several threads append into forks of one parent at once: copy-on-write of shared tail
// blocks and the pool's free list are exercised concurrently (run under ASan/TSan-ish).
TEST(concurrent_appends_into_forks) {
  auto pool = std::make_shared<block_pool>(dtype::f32, 16, 4, 4096, 7);
  cache c(pool, 2, 2, nullptr);
  const int64_t parent = c.seq_add();
  for (int l = 0; l < 2; ++l) append_const(c, l, parent, 6, 0.f);
  const int T = 4, M = 50;
  std::vector<int64_t> kids;
  for (int t = 0; t < T; ++t) kids.push_back(c.seq_fork(parent));
  kvtest::run_together(T, [&](int t) {
    for (int m = 0; m < M; ++m)
      for (int l = 0; l < 2; ++l) append_const(c, l, kids[t], 1, 1000.f * (t + 1) + m);
  });
  for (int t = 0; t < T; ++t)
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) {
        auto k = gather_keys(c, l, h, kids[t]);
        CHECK_EQ(k.size(), size_t((6 + M) * 16));
        for (int j = 0; j < 6; ++j) CHECK_EQ(k[j * 16], static_cast<float>(j));
        for (int m = 0; m < M; ++m) CHECK_EQ(k[(6 + m) * 16 + 15], 1000.f * (t + 1) + m);
      }
  for (int64_t s : c.seq_ids()) c.seq_drop(s);
  CHECK_EQ(pool->used_blocks(), 0);
}

// Hogwild!-style segments: T threads each append M tokens of varying sizes into their own
// segments (fresh sequences and forks of one shared prompt, so copy-on-write and the pool's
// free list are contended), starting new segments as they go; then every token of every
// segment is checked (value = thread, segment, token), and dropping everything empties the pool.
TEST(concurrent_segment_appends_checksums) {
  const int D = 8, H = 2, T = 4, M = 300;
  auto pool = std::make_shared<block_pool>(dtype::f32, D, 4, 1 << 16, 5);
  cache c(pool, 2, H, nullptr);
  const int64_t prompt = c.seq_add();
  for (int l = 0; l < 2; ++l) append_const(c, l, prompt, 7, -100.f);
  struct seg { int64_t id; int64_t base; std::vector<float> values; };
  std::vector<std::vector<seg>> segs(T);
  for (int t = 0; t < T; ++t) segs[t].push_back({t % 2 ? c.seq_fork(prompt) : c.seq_add(), t % 2 ? 7 : 0, {}});
  std::vector<std::vector<int64_t>> extra_ids(T);
  // new segments are made up front (seq_add is a structural operation: not concurrent)
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < 5; ++k) extra_ids[t].push_back(c.seq_add());
  kvtest::run_together(T, [&](int t) {
    size_t next_extra = 0;
    for (int m = 0; m < M; ++m) {
      if (m % 70 == 69 && next_extra < extra_ids[t].size()) segs[t].push_back({extra_ids[t][next_extra++], 0, {}});
      seg& s = segs[t].back();
      const int64_t n = 1 + (m * 7 + t) % 3;
      const float value = 10000.f * (t + 1) + 10.f * static_cast<float>(segs[t].size()) + static_cast<float>(m);
      std::vector<float> k(static_cast<size_t>(H * n * D)), v(k.size());
      for (int h = 0; h < H; ++h)
        for (int64_t j = 0; j < n; ++j)
          for (int d = 0; d < D; ++d) {
            k[(h * n + j) * D + d] = value + 0.25f * static_cast<float>(j);
            v[(h * n + j) * D + d] = -(value + 0.25f * static_cast<float>(j));
          }
      for (int l = 0; l < 2; ++l)
        c.append(l, s.id, view(k.data(), dtype::f32, {H, n, D}), view(v.data(), dtype::f32, {H, n, D}), nullptr);
      for (int64_t j = 0; j < n; ++j) s.values.push_back(value + 0.25f * static_cast<float>(j));
    }
  });
  int64_t tokens = 0;
  for (int t = 0; t < T; ++t)
    for (const seg& s : segs[t])
      for (int l = 0; l < 2; ++l)
        for (int h = 0; h < H; ++h) {
          auto k = gather_keys(c, l, h, s.id);
          CHECK_EQ(k.size(), static_cast<size_t>((s.base + static_cast<int64_t>(s.values.size())) * D));
          for (int64_t j = 0; j < s.base; ++j) CHECK_EQ(k[j * D], -100.f + static_cast<float>(j));
          double sum = 0, want = 0;
          for (size_t j = 0; j < s.values.size(); ++j) {
            for (int d = 0; d < D; ++d) sum += k[(s.base + static_cast<int64_t>(j)) * D + d];
            want += static_cast<double>(s.values[j]) * D;
            CHECK_EQ(k[(s.base + static_cast<int64_t>(j)) * D + D - 1], s.values[j]);
          }
          CHECK_EQ(sum, want);
          tokens += static_cast<int64_t>(s.values.size());
        }
  CHECK(tokens > T * M);
  for (int64_t s : c.seq_ids()) c.seq_drop(s);
  CHECK_EQ(pool->used_blocks(), 0);
}

// H2O statistic and policy: under the sanitizers, with evictions, forks and a bf16 pool.
TEST(accumulate_attention_and_heavy_hitter) {
  auto pool = std::make_shared<block_pool>(dtype::bf16, 8, 4, 256);
  cache c(pool, 1, 2, make_plan("heavy_hitter", plan_params().set("ratio", 0.25).set("recent", 3)));
  const int64_t s = c.seq_add();
  kvtest::lcg rng(11);
  for (int step = 0; step < 30; ++step) {
    auto k = rng.vec(2 * 8), v = rng.vec(2 * 8), q = rng.vec(4 * 8);
    c.append(0, s, view(k.data(), dtype::f32, {2, 1, 8}), view(v.data(), dtype::f32, {2, 1, 8}), nullptr);
    c.accumulate_attention(0, {s}, view(q.data(), dtype::f32, {1, 4, 1, 8}), 0.f);
    // each query's probabilities sum to 1: the live scores of a head sum to the queries seen
    // minus what eviction took away, so they stay positive and bounded
    const head_store& hs = c.store(0, 0, s);
    float total = 0;
    for (int64_t sl = 0; sl < hs.n_slots(); ++sl)
      if (hs.live(sl)) total += hs.score(sl);
    CHECK(total > 0.f && total <= 2.f * (step + 1) + 1e-3f);
    c.apply_policy(0, s);
    CHECK(c.length(0, 0, s) <= 3 + static_cast<int64_t>(std::ceil(0.25 * (step + 1))));
  }
  const int64_t f = c.seq_fork(s);
  std::vector<float> q(2 * 4 * 8, 0.5f);  // [2, 4, 1, 8]
  c.accumulate_attention(0, {s, f}, view(q.data(), dtype::f32, {2, 4, 1, 8}), 0.f);
  CHECK_THROWS(c.accumulate_attention(0, {s, s}, view(q.data(), dtype::f32, {2, 4, 1, 8}), 0.f), std::invalid_argument);
  c.seq_drop(f);
  c.seq_drop(s);
  CHECK_EQ(pool->used_blocks(), 0);
}

// Task-KV's keep_set plan keeps sinks, recent tokens and its listed ords (a listed ord past
// the tokens seen is harmless), with dead slots (evicted earlier, ord -1) in the head's table.
TEST(keep_set_plan_with_dead_slots) {
  auto pool = small_pool(256);
  cache c(pool, 1, 1, nullptr);
  const int64_t s = c.seq_add();
  append_const(c, 0, s, 30, 0.f);  // token j has key j
  const int32_t dead[] = {6, 7, 12};
  c.evict(0, 0, s, dead, 3);
  c.set_head_plan(0, 0, s, make_plan("keep_set", plan_params().set("sinks", 2).set("recent", 3)
                                                     .set("ords", std::vector<int32_t>{5, 7, 9, 17, 100})));
  auto kept = [&] {
    std::vector<float> k = gather_keys(c, 0, 0, s), out;
    for (size_t i = 0; i < k.size(); i += 8) out.push_back(k[i]);
    std::sort(out.begin(), out.end());
    return out;
  };
  c.apply_policy(0, s);
  CHECK(kept() == (std::vector<float>{0, 1, 5, 9, 17, 27, 28, 29}));
  append_const(c, 0, s, 5, 30.f);  // tokens 30..34
  c.apply_policy(0, s);
  CHECK(kept() == (std::vector<float>{0, 1, 5, 9, 17, 32, 33, 34}));
  c.seq_drop(s);
  CHECK_EQ(pool->used_blocks(), 0);
}

// Scattered evictions through a plan are compacted: live rows move into lower exclusive
// blocks, whole blocks return to the pool, a forked parent's shared blocks are never written.
TEST(policy_eviction_compacts) {
  auto pool = small_pool(256);
  cache c(pool, 1, 1, nullptr);
  const int64_t parent = c.seq_add();
  const int64_t n = 40;
  std::vector<float> k(static_cast<size_t>(n * 8)), v(k.size());
  std::vector<uint8_t> cls(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    for (int d = 0; d < 8; ++d) {
      k[i * 8 + d] = static_cast<float>(i);
      v[i * 8 + d] = -static_cast<float>(i);
    }
    cls[i] = i % 4 == 0 ? kClassSpecial : 0;
  }
  auto cv = view(cls.data(), dtype::u8, {n});
  c.append(0, parent, view(k.data(), dtype::f32, {1, n, 8}), view(v.data(), dtype::f32, {1, n, 8}), nullptr, &cv);
  const auto parent_keys = gather_keys(c, 0, 0, parent);
  const int64_t child = c.seq_fork(parent);
  c.set_head_plan(0, 0, child, make_plan("fastgen", plan_params().set("level", 0).set("local_window", 0).set("r_frequent", 0.0)));
  c.apply_policy(0, child);
  CHECK_EQ(c.length(0, 0, child), 10);
  CHECK(gather_keys(c, 0, 0, parent) == parent_keys);
  auto kc = gather_keys(c, 0, 0, child);
  for (int i = 0; i < 10; ++i) CHECK_EQ(kc[i * 8], static_cast<float>(4 * i));
  int64_t held = 0;
  for (block_id b : c.store(0, 0, child).table()) held += b >= 0;
  CHECK_EQ(held, 10);   // every block still shared with the parent: nothing written
  c.seq_drop(parent);   // now the child's blocks are exclusive: the next pass compacts them
  c.apply_policy(0, child);
  held = 0;
  for (block_id b : c.store(0, 0, child).table()) held += b >= 0;
  CHECK_EQ(held, 3);    // ceil(10 / 4)
  kc = gather_keys(c, 0, 0, child);
  for (int i = 0; i < 10; ++i) CHECK_EQ(kc[i * 8], static_cast<float>(4 * i));
  c.seq_drop(child);
  CHECK_EQ(pool->used_blocks(), 0);
}

// Misuse: two threads writing one sequence, a reader racing a writer. Each collision is a
// concurrent_use_error from the operation that noticed it (which did nothing); nothing is torn
// and no memory is corrupted (this runs under ASan and TSan). A fork racing with appends to its
// source waits for them and sees whole appends only.
TEST(concurrent_misuse_raises_instead_of_corrupting) {
  auto pool = std::make_shared<block_pool>(dtype::f32, 8, 4, 1 << 14, 16);
  cache c(pool, 1, 2, nullptr);
  const int64_t s = c.seq_add();
  const int T = 4, M = 300;
  std::atomic<int> collisions{0}, done{0};
  kvtest::run_together(T, [&](int t) {
    std::vector<float> k(2 * 3 * 8, static_cast<float>(t)), q(4 * 8, 0.5f), out(4 * 8);
    for (int m = 0; m < M; ++m) {
      try {
        if (t % 2 == 0) {
          c.append(0, s, view(k.data(), dtype::f32, {2, 3, 8}), view(k.data(), dtype::f32, {2, 3, 8}), nullptr);
          done.fetch_add(1);
        } else {
          decode_attention_cache(c, 0, {{cache_segment{s, 0}}}, view(q.data(), dtype::f32, {1, 4, 8}),
                                 view(out.data(), dtype::f32, {1, 4, 8}), 0.f, rope_spec{});
        }
      } catch (const concurrent_use_error& e) {
        collisions.fetch_add(1);
        CHECK(std::string(e.what()).find("sequence") != std::string::npos);
      } catch (const std::invalid_argument&) {
        // attention before the first append: no key yet is fine (zeros), nothing else expected
      }
    }
  });
  // every append that returned is whole: 3 tokens per head each
  CHECK_EQ(c.seq_length(s), int64_t(3) * done.load());
  CHECK_EQ(c.length(0, 0, s), c.length(0, 1, s));
  std::printf("  %d collisions reported, %d appends done\n", collisions.load(), done.load());
  // forks racing with appends to their source: every fork holds a whole number of appends
  const int64_t src = c.seq_add();
  std::vector<int64_t> forks;
  std::mutex mu;
  std::thread writer([&] {
    std::vector<float> k(2 * 5 * 8, 1.f);
    for (int m = 0; m < 200; ++m)
      c.append(0, src, view(k.data(), dtype::f32, {2, 5, 8}), view(k.data(), dtype::f32, {2, 5, 8}), nullptr);
  });
  std::thread forker([&] {
    for (int m = 0; m < 100; ++m) {
      const int64_t f = c.seq_fork(src);
      std::lock_guard<std::mutex> lock(mu);
      forks.push_back(f);
    }
  });
  writer.join();
  forker.join();
  for (int64_t f : forks) {
    CHECK_EQ(c.seq_length(f) % 5, int64_t(0));
    CHECK_EQ(c.length(0, 0, f), c.length(0, 1, f));
  }
  // rollback and eviction racing with appends on one sequence: collisions raise, nothing tears
  const int64_t rb = c.seq_add();
  std::atomic<int> rb_hits{0};
  std::thread app([&] {
    std::vector<float> k(2 * 3 * 8, 2.f);
    for (int m = 0; m < 400; ++m) try {
        c.append(0, rb, view(k.data(), dtype::f32, {2, 3, 8}), view(k.data(), dtype::f32, {2, 3, 8}), nullptr);
      } catch (const concurrent_use_error&) {
        rb_hits.fetch_add(1);
      }
  });
  std::thread back([&] {
    for (int m = 0; m < 400; ++m) try {
        if (m % 2 == 0) {
          c.seq_rollback(rb, 3);
        } else {
          const int32_t slot = 0;
          c.evict(0, 1, rb, &slot, 1);
        }
      } catch (const concurrent_use_error&) {
        rb_hits.fetch_add(1);
      } catch (const std::logic_error&) {
        // rollback past the start, or slot 0 no longer live: clean errors, nothing done
      }
  });
  app.join();
  back.join();
  CHECK_EQ(c.seq_length(rb) % 3, int64_t(0));
  CHECK(c.length(0, 0, rb) >= c.length(0, 1, rb));
  std::printf("  rollback/evict vs append: %d collisions reported\n", rb_hits.load());
  for (int64_t id : c.seq_ids()) c.seq_drop(id);
  CHECK_EQ(pool->used_blocks(), 0);
}
