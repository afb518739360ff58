// Snapshots: a round trip restores every sequence exactly (slots, metadata, plans, shared
// blocks), and damaged blobs are refused without touching the cache (run under ASan/UBSan by
// the tests, which makes the mutation loop a small fuzzer of the parser).
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

#include "helpers.h"
#include "kvloom/block_pool.h"
#include "kvloom/cache.h"
#include "kvloom/plan.h"
#include "test.h"

using namespace kvloom;
using kvtest::view;

namespace {

void fill(cache& c, int layer, int64_t seq, int64_t n, float base) {
  const int H = c.n_kv_heads(), D = c.head_dim();
  std::vector<float> k(static_cast<size_t>(H * n * D)), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = base + 0.25f * static_cast<float>(i % 97);
    v[i] = base - 0.5f * static_cast<float>(i % 89);
  }
  std::vector<uint8_t> cls(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) cls[i] = static_cast<uint8_t>(i % 3);
  c.append(layer, seq, view(k.data(), dtype::f32, {H, n, D}), view(v.data(), dtype::f32, {H, n, D}), nullptr,
           &static_cast<const tensor_view&>(view(cls.data(), dtype::u8, {n})));
}

// Everything observable about one sequence.
std::vector<float> observe(const cache& c, int64_t seq) {
  std::vector<float> out;
  out.push_back(static_cast<float>(c.seq_length(seq)));
  for (int l = 0; l < c.n_layers(); ++l)
    for (int h = 0; h < c.n_kv_heads(); ++h) {
      for (const slot_info& s : c.live_slots(l, h, seq))
        for (float x : {static_cast<float>(s.slot), static_cast<float>(s.ord), static_cast<float>(s.pos),
                        static_cast<float>(s.cls), s.score})
          out.push_back(x);
      const int64_t n = c.length(l, h, seq), D = c.head_dim();
      std::vector<float> k(static_cast<size_t>(n * D)), v(k.size());
      c.gather(l, h, seq, view(k.data(), dtype::f32, {n, D}), view(v.data(), dtype::f32, {n, D}), nullptr, nullptr);
      out.insert(out.end(), k.begin(), k.end());
      out.insert(out.end(), v.begin(), v.end());
      for (char ch : c.plan_name(l, h, seq)) out.push_back(static_cast<float>(ch));
    }
  return out;
}

}  // namespace

TEST(snapshot_round_trip_keeps_everything) {
  auto pool = std::make_shared<block_pool>(dtype::f16, 8, 4, 4096, 16);
  cache c(pool, 2, 2, make_plan("window", plan_params().set("sinks", 1.0).set("recent", 5.0)));
  const int64_t a = c.seq_add();
  for (int l = 0; l < 2; ++l) fill(c, l, a, 11, 1.f + l);
  const int64_t b = c.seq_fork(a);  // shares a's blocks
  for (int l = 0; l < 2; ++l) fill(c, l, b, 3, 7.f);
  c.apply_policy(0, b);
  c.set_head_plan(1, 1, a, make_plan("heavy_hitter", plan_params().set("ratio", 0.5).set("recent", 2.0)));
  const int32_t gone = 2;
  c.evict(1, 0, a, &gone, 1);
  const std::vector<uint8_t> blob = c.export_sequences({a, b});

  auto pool2 = std::make_shared<block_pool>(dtype::f16, 8, 4, 4096, 16);
  cache d(pool2, 2, 2);
  const std::vector<int64_t> ids = d.import_sequences(blob.data(), blob.size(), true);
  CHECK(ids == std::vector<int64_t>({a, b}));
  CHECK(observe(d, a) == observe(c, a));
  CHECK(observe(d, b) == observe(c, b));
  CHECK_EQ(d.blocks_held(), c.blocks_held());  // forks still share
  CHECK_EQ(d.plan_name(1, 1, a), std::string("heavy_hitter"));
  // the restored plans act like the originals
  fill(c, 0, a, 4, 3.f);
  fill(d, 0, a, 4, 3.f);
  c.apply_policy(0, a);
  d.apply_policy(0, a);
  CHECK(observe(d, a) == observe(c, a));
  // fresh ids into a cache that has sequences; a second import with the same ids is refused
  const std::vector<int64_t> again = d.import_sequences(blob.data(), blob.size(), false);
  CHECK(again[0] > b && again[1] > b);
  CHECK_THROWS(d.import_sequences(blob.data(), blob.size(), true), std::invalid_argument);
}

TEST(snapshot_refuses_other_geometry_and_damage) {
  auto pool = std::make_shared<block_pool>(dtype::f32, 8, 4, 1024, 16);
  cache c(pool, 2, 2);
  const int64_t a = c.seq_add();
  for (int l = 0; l < 2; ++l) fill(c, l, a, 9, 0.5f);
  const std::vector<uint8_t> blob = c.export_sequences({a});
  {
    cache other(std::make_shared<block_pool>(dtype::f32, 8, 4, 1024, 16), 3, 2);
    CHECK_THROWS(other.import_sequences(blob.data(), blob.size()), std::invalid_argument);
    cache half(std::make_shared<block_pool>(dtype::f16, 8, 4, 1024, 16), 2, 2);
    CHECK_THROWS(half.import_sequences(blob.data(), blob.size()), std::invalid_argument);
  }
  cache d(std::make_shared<block_pool>(dtype::f32, 8, 4, 1024, 16), 2, 2);
  for (size_t cut = 0; cut < blob.size(); cut += 7)  // every truncation
    CHECK_THROWS(d.import_sequences(blob.data(), cut), std::invalid_argument);
  std::mt19937 rng(7);
  int ok = 0, refused = 0;
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> m = blob;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) m[rng() % m.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    const int64_t used = d.pool().used_blocks();
    const size_t n_seqs = d.seq_ids().size();
    try {
      for (int64_t id : d.import_sequences(m.data(), m.size())) d.seq_drop(id);
      ++ok;  // a flip in block data or a harmless field: a valid snapshot of other contents
    } catch (const std::invalid_argument&) {
      ++refused;
      CHECK_EQ(d.pool().used_blocks(), used);  // nothing taken
      CHECK_EQ(d.seq_ids().size(), n_seqs);
    }
  }
  CHECK(refused > 0 && ok > 0);
  CHECK_EQ(d.pool().used_blocks(), int64_t(0));
}

TEST(snapshot_capacity_error_takes_nothing) {
  cache c(std::make_shared<block_pool>(dtype::f32, 8, 4, 1024, 16), 1, 2);
  const int64_t a = c.seq_add();
  fill(c, 0, a, 40, 1.f);
  const std::vector<uint8_t> blob = c.export_sequences({a});
  cache tiny(std::make_shared<block_pool>(dtype::f32, 8, 4, 5, 5), 1, 2);
  CHECK_THROWS(tiny.import_sequences(blob.data(), blob.size()), capacity_error);
  CHECK_EQ(tiny.pool().used_blocks(), int64_t(0));
  CHECK(tiny.seq_ids().empty());
}
