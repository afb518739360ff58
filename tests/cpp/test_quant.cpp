// Quantized storage in the cache (kvloom/quant.h, cache::set_quantized): sealing, attention over
// sealed blocks, exact byte counts, forks, and concurrent appends that seal (run under the
// sanitizers by tests/test_cpp_core.py).
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "helpers.h"
#include "kvloom/attention.h"
#include "kvloom/block_pool.h"
#include "kvloom/cache.h"
#include "kvloom/quant.h"
#include "test.h"

using namespace kvloom;
using kvtest::view;

namespace {

constexpr int kD = 16, kBs = 4;

void append_random(cache& c, int64_t seq, int64_t n, kvtest::lcg& rng, std::vector<float>* keys = nullptr) {
  const int H = c.n_kv_heads();
  std::vector<float> k(static_cast<size_t>(H * n * kD)), v(k.size());
  for (auto& x : k) x = rng.next() * 4.f;
  for (auto& x : v) x = rng.next();
  c.append(0, seq, view(k.data(), dtype::f32, {H, n, kD}), view(v.data(), dtype::f32, {H, n, kD}), nullptr);
  if (keys) keys->insert(keys->end(), k.begin(), k.end());
}

size_t count_sealed(const cache& c, int64_t seq) {
  size_t n = 0;
  for (int h = 0; h < c.n_kv_heads(); ++h)
    for (uint8_t x : c.sealed_entries(0, h, seq)) n += x;
  return n;
}

}  // namespace

TEST(quantized_cache_seals_attends_and_frees) {
  auto pool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 256, 8);
  auto qpool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 256, 8, device_kind::cpu, 0, 4);
  CHECK(qpool->quant() != nullptr);
  CHECK_EQ(qpool->block_bytes() % 64, size_t(0));
  cache c(pool, 1, 2, nullptr);
  c.set_quantized(qpool);
  kvtest::lcg rng(7);
  const int64_t s = c.seq_add();
  append_random(c, s, 10, rng);
  CHECK_EQ(count_sealed(c, s), size_t(0));  // the append wrote every block it holds
  append_random(c, s, 1, rng);
  CHECK_EQ(count_sealed(c, s), size_t(4));  // two full blocks per head sealed by the next append
  CHECK_EQ(c.memory_bytes(), 4 * qpool->block_bytes() + 2 * pool->block_bytes());
  // attention over sealed + full-precision blocks equals attention over the gathered contents
  const int Hq = 4, G = 2;
  std::vector<float> q(Hq * kD), out(Hq * kD);
  for (auto& x : q) x = rng.next();
  decode_attention_cache(c, 0, {{{s, 0}}}, view(q.data(), dtype::f32, {1, Hq, kD}), view(out.data(), dtype::f32, {1, Hq, kD}),
                         0.25f, rope_spec{});
  for (int h = 0; h < 2; ++h) {
    const int64_t L = c.length(0, h, s);
    std::vector<float> k(L * kD), v(L * kD);
    c.gather(0, h, s, view(k.data(), dtype::f32, {L, kD}), view(v.data(), dtype::f32, {L, kD}), nullptr, nullptr);
    for (int g = 0; g < G; ++g) {
      const float* qq = &q[(h * G + g) * kD];
      std::vector<double> w(L);
      double mx = -1e300, z = 0;
      for (int64_t t = 0; t < L; ++t) {
        double d = 0;
        for (int i = 0; i < kD; ++i) d += double(qq[i]) * k[t * kD + i];
        w[t] = d * 0.25;
        mx = std::max(mx, w[t]);
      }
      for (auto& x : w) z += (x = std::exp(x - mx));
      for (int i = 0; i < kD; ++i) {
        double o = 0;
        for (int64_t t = 0; t < L; ++t) o += w[t] / z * v[t * kD + i];
        CHECK(std::fabs(o - out[(h * G + g) * kD + i]) < 1e-5);
      }
    }
  }
  // a fork shares the sealed blocks; evicting all of a sealed block's tokens frees it
  const int64_t f = c.seq_fork(s);
  const size_t before = qpool->used_blocks();
  append_random(c, f, 6, rng);
  CHECK_EQ(qpool->used_blocks(), static_cast<int64_t>(before));  // every block it holds was just written
  append_random(c, f, 1, rng);
  CHECK_EQ(qpool->used_blocks(), static_cast<int64_t>(before + 4));  // its copy of the open block, and the next
  const int32_t first[kBs] = {0, 1, 2, 3};
  c.evict(0, 0, s, first, kBs);
  c.evict(0, 0, f, first, kBs);
  CHECK_EQ(c.sealed_entries(0, 0, s)[0], uint8_t(0));
  c.seq_drop(s);
  c.seq_drop(f);
  CHECK_EQ(pool->used_blocks(), 0);
  CHECK_EQ(qpool->used_blocks(), 0);
  CHECK_EQ(c.memory_bytes(), size_t(0));
}

TEST(quantized_cache_refuses_what_it_cannot_store) {
  auto pool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 64, 8);
  auto qpool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 64, 8, device_kind::cpu, 0, 8);
  auto other = std::make_shared<block_pool>(dtype::f32, kD, 8, 64, 8, device_kind::cpu, 0, 8);
  cache c(pool, 1, 1, nullptr);
  CHECK_THROWS(c.set_quantized(pool), std::invalid_argument);   // not a quantized pool
  CHECK_THROWS(c.set_quantized(other), std::invalid_argument);  // another block size
  c.set_quantized(qpool);
  const int64_t s = c.seq_add();
  std::vector<float> k(3 * kD, 1.f), v(3 * kD, 1.f);
  k[5] = NAN;
  CHECK_THROWS(c.append(0, s, view(k.data(), dtype::f32, {1, 3, kD}), view(v.data(), dtype::f32, {1, 3, kD}), nullptr),
               std::invalid_argument);
  CHECK_EQ(c.seq_length(s), int64_t(0));
  CHECK_THROWS(block_pool(dtype::f32, 12, 4, 8, 0, device_kind::cpu, 0, 4), std::invalid_argument);  // D % 8
  CHECK_THROWS(block_pool(dtype::f32, 16, 4, 8, 0, device_kind::cpu, 0, 3), std::invalid_argument);  // bits
}

// Threads append into their own forks of one prompt, sealing blocks (quantizing, taking and
// releasing blocks of both pools) concurrently; every token stays within its format's error.
// 2 bits also run the range refits and keep each head's first block in full precision.
TEST(concurrent_quantized_appends_into_forks) {
  for (int bits : {8, 2}) {
    auto pool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 4096, 16);
    auto qpool = std::make_shared<block_pool>(dtype::f32, kD, kBs, 4096, 16, device_kind::cpu, 0, bits);
    cache c(pool, 1, 2, nullptr);
    c.set_quantized(qpool);
    kvtest::lcg rng(3);
    const int64_t parent = c.seq_add();
    append_random(c, parent, 7, rng);
    const int T = 4, M = 40;
    std::vector<int64_t> kids;
    for (int t = 0; t < T; ++t) kids.push_back(c.seq_fork(parent));
    kvtest::run_together(T, [&](int t) {
      kvtest::lcg local(100 + t);
      for (int m = 0; m < M; ++m) append_random(c, kids[t], 1 + m % 3, local);
    });
    for (int t = 0; t < T; ++t) {
      CHECK(count_sealed(c, kids[t]) > 0);
      if (bits == 2)
        for (int h = 0; h < 2; ++h) CHECK_EQ(c.sealed_entries(0, h, kids[t])[0], uint8_t(0));  // the sinks' block
      const int64_t L = c.length(0, 1, kids[t]);
      int64_t want = 7;
      for (int m = 0; m < M; ++m) want += 1 + m % 3;
      CHECK_EQ(L, want);
      std::vector<float> k(L * kD), v(L * kD);
      c.gather(0, 1, kids[t], view(k.data(), dtype::f32, {L, kD}), view(v.data(), dtype::f32, {L, kD}), nullptr, nullptr);
      // values in [-4, 4): int8 stays within them; a 2-bit refit range may reach a little past
      // them; garbage would show
      for (float x : k) CHECK(std::fabs(x) <= (bits == 8 ? 4.1f : 8.f));
    }
    for (int64_t s : c.seq_ids()) c.seq_drop(s);
    CHECK_EQ(pool->used_blocks(), 0);
    CHECK_EQ(qpool->used_blocks(), 0);
  }
}

// Snapshot version 2: sealed blocks travel as they are (no re-quantization), shared once; the
// importer checks the format and restores every token bit for bit, or refuses and takes nothing.
TEST(quantized_snapshot_round_trip) {
  auto make = [](int bits) {
    auto c = std::make_unique<cache>(std::make_shared<block_pool>(dtype::f32, kD, kBs, 256, 8), 1, 2, nullptr);
    if (bits) c->set_quantized(std::make_shared<block_pool>(dtype::f32, kD, kBs, 256, 8, device_kind::cpu, 0, bits));
    return c;
  };
  auto src = make(4);
  kvtest::lcg rng(11);
  const int64_t a = src->seq_add();
  append_random(*src, a, 13, rng);
  append_random(*src, a, 1, rng);
  const int32_t ev[2] = {1, 6};
  src->evict(0, 1, a, ev, 2);  // dead rows inside sealed blocks
  const int64_t b = src->seq_fork(a);
  append_random(*src, b, 5, rng);
  const std::vector<uint8_t> blob = src->export_sequences({a, b});
  auto dst = make(4);
  const std::vector<int64_t> ids = dst->import_sequences(blob.data(), blob.size());
  CHECK_EQ(ids.size(), size_t(2));
  CHECK_EQ(dst->memory_bytes(), src->memory_bytes());  // forks still share
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      const int64_t s0 = i ? b : a, s1 = ids[i];
      CHECK(src->sealed_entries(0, h, s0) == dst->sealed_entries(0, h, s1));
      const int64_t L = src->length(0, h, s0);
      CHECK_EQ(dst->length(0, h, s1), L);
      std::vector<float> k0(L * kD), v0(L * kD), k1(L * kD), v1(L * kD);
      src->gather(0, h, s0, view(k0.data(), dtype::f32, {L, kD}), view(v0.data(), dtype::f32, {L, kD}), nullptr, nullptr);
      dst->gather(0, h, s1, view(k1.data(), dtype::f32, {L, kD}), view(v1.data(), dtype::f32, {L, kD}), nullptr, nullptr);
      CHECK(k0 == k1 && v0 == v1);
    }
  for (int bits : {0, 8}) {  // another format, or none: refused, nothing taken
    auto other = make(bits);
    CHECK_THROWS(other->import_sequences(blob.data(), blob.size()), std::invalid_argument);
    CHECK_EQ(other->memory_bytes(), size_t(0));
  }
  for (size_t cut : {blob.size() - 9, blob.size() / 2}) {
    auto d2 = make(4);
    CHECK_THROWS(d2->import_sequences(blob.data(), cut), std::invalid_argument);
    CHECK_EQ(d2->pool().used_blocks(), 0);
    CHECK_EQ(d2->sealed_pool()->used_blocks(), 0);
  }
}

// The fused kernel's scratch at its widest: a query group of 256 over D 512 in 2 bits (32 value
// groups a row, so the weighted steps alone are 32 * 256 * 32 floats a block); the sanitizer
// builds catch a write past the scratch, and the result equals attention over the dequantized
// blocks.
TEST(quantized_attention_widest_group_and_head_dim) {
  const int G = 256, D = 512, bs = 32, T = 64, bits = 2;
  const quant_layout L = make_quant_layout(bits, bs, D);
  kvtest::lcg rng(11);
  std::vector<float> k(static_cast<size_t>(T) * D), v(k.size()), q(static_cast<size_t>(G) * D), out(q.size());
  for (auto& x : k) x = rng.next();
  for (auto& x : v) x = rng.next();
  for (auto& x : q) x = rng.next();
  std::vector<uint8_t> blocks(static_cast<size_t>(T / bs) * L.bytes);
  for (int b = 0; b < T / bs; ++b)
    quantize_block(L, &k[static_cast<size_t>(b) * bs * D], &v[static_cast<size_t>(b) * bs * D], bs, nullptr,
                   &blocks[b * L.bytes]);
  std::vector<float> kd(k.size()), vd(v.size());
  for (int b = 0; b < T / bs; ++b)
    dequantize_block(L, &blocks[b * L.bytes], bs, &kd[static_cast<size_t>(b) * bs * D], &vd[static_cast<size_t>(b) * bs * D]);
  decode_attention_quantized(view(q.data(), dtype::f32, {1, G, D}),
                             view(blocks.data(), dtype::u8, {1, 1, T / bs, static_cast<int64_t>(L.bytes)}), T, L,
                             view(out.data(), dtype::f32, {1, G, D}), 1.f / std::sqrt(static_cast<float>(D)));
  CHECK(kvtest::max_err(out, kvtest::naive(q, kd, vd, G, 1, T, D)) < 1e-5);
}
