#include <cmath>
#include <memory>
#include <vector>

#include "diagnostics.h"
#include "helpers.h"
#include "kvloom/attention.h"
#include "kvloom/cache.h"
#include "test.h"

using namespace kvloom;
using kvtest::view;

using kvtest::max_err;
using kvtest::naive;

TEST(half_conversions_round_trip) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    const float f = f16_to_f32(x);
    if (std::isnan(f)) continue;
    if (f32_to_f16(f) != x) ++bad;
    if (f32_to_bf16(bf16_to_f32(x)) != x && !std::isnan(bf16_to_f32(x))) ++bad;
  }
  CHECK_EQ(bad, 0);
  CHECK_EQ(f32_to_f16(1.0f), uint16_t(0x3c00));
  CHECK_EQ(f32_to_f16(65520.f), uint16_t(0x7c00));       // rounds to inf
  CHECK_EQ(f32_to_f16(1.0f + 1.0f / 2048), uint16_t(0x3c00));  // tie to even
  CHECK_EQ(f32_to_bf16(1.0f + 1.0f / 256), uint16_t(0x3f80));  // tie to even
  CHECK(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

TEST(dense_attention_matches_naive_all_dtypes_and_paths) {
  kvtest::lcg rng(42);
  const int shapes[][4] = {{8, 2, 300, 64}, {9, 3, 77, 80}, {32, 1, 1000, 128}, {4, 4, 5, 256}, {6, 3, 40, 36}};
  for (const char* isa : {"auto", "avx2", "generic"}) {  // auto is AVX-512 where the CPU has it
    force_isa(isa);
    for (const auto& sh : shapes) {
      const int Hq = sh[0], Hkv = sh[1], T = sh[2], D = sh[3];
      auto q = rng.vec(size_t(Hq * D)), k = rng.vec(size_t(Hkv * T * D)), v = rng.vec(k.size());
      for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
        // round inputs to the storage dtype so the oracle sees the same values
        std::vector<uint16_t> qh(q.size()), kh(k.size()), vh(v.size());
        std::vector<float> qr(q), kr(k), vr(v);
        auto round = [&](std::vector<float>& src, std::vector<uint16_t>& dst) {
          for (size_t i = 0; i < src.size(); ++i) {
            dst[i] = t == dtype::f16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
            src[i] = t == dtype::f16 ? f16_to_f32(dst[i]) : bf16_to_f32(dst[i]);
          }
        };
        void *qp = qr.data(), *kp = kr.data(), *vp = vr.data();
        if (t != dtype::f32) {
          round(qr, qh);
          round(kr, kh);
          round(vr, vh);
          qp = qh.data();
          kp = kh.data();
          vp = vh.data();
        }
        std::vector<float> out(size_t(Hq * D));
        dense_segment seg{view(kp, t, {1, Hkv, T, D}), view(vp, t, {1, Hkv, T, D}), nullptr};
        decode_attention_dense(view(qp, t, {1, Hq, D}), {seg}, view(out.data(), dtype::f32, {1, Hq, D}), 0.f, rope_spec{});
        const double err = max_err(out, naive(qr, kr, vr, Hq, Hkv, T, D));
        if (err > 2e-5) std::printf("  shape %d/%d/%d/%d dtype %s isa %s: err %g\n", Hq, Hkv, T, D, dtype_name(t), isa, err);
        CHECK(err <= 2e-5);
      }
    }
  }
  force_isa("auto");
}

TEST(cache_attention_skips_evicted_slots) {
  kvtest::lcg rng(7);
  const int Hkv = 2, Hq = 4, D = 64, T = 50;
  auto pool = std::make_shared<block_pool>(dtype::f32, D, 16, 64);
  cache c(pool, 1, Hkv, nullptr);
  const int64_t s = c.seq_add();
  auto k = rng.vec(size_t(Hkv * T * D)), v = rng.vec(k.size());
  c.append(0, s, view(k.data(), dtype::f32, {Hkv, T, D}), view(v.data(), dtype::f32, {Hkv, T, D}), nullptr);
  // evict every third token of head 0 and nothing of head 1
  std::vector<int32_t> victims;
  for (int i = 0; i < T; i += 3) victims.push_back(i);
  c.evict(0, 0, s, victims.data(), static_cast<int64_t>(victims.size()));
  auto q = rng.vec(size_t(Hq * D));
  std::vector<float> out(q.size());
  decode_attention_cache(c, 0, {{cache_segment{s, 0}}}, view(q.data(), dtype::f32, {1, Hq, D}),
                         view(out.data(), dtype::f32, {1, Hq, D}), 0.f, rope_spec{});
  // expected: head 0 over kept tokens only
  std::vector<float> k0, v0;
  for (int t = 0; t < T; ++t)
    if (t % 3 != 0)
      for (int d = 0; d < D; ++d) {
        k0.push_back(k[t * D + d]);
        v0.push_back(v[t * D + d]);
      }
  const int T0 = static_cast<int>(k0.size()) / D;
  auto e0 = naive(std::vector<float>(q.begin(), q.begin() + 2 * D), k0, v0, 2, 1, T0, D);
  auto e1 = naive(std::vector<float>(q.begin() + 2 * D, q.end()),
                  std::vector<float>(k.begin() + T * D, k.end()), std::vector<float>(v.begin() + T * D, v.end()), 2, 1, T, D);
  std::vector<double> expect(e0);
  expect.insert(expect.end(), e1.begin(), e1.end());
  CHECK(max_err(out, expect) <= 2e-5);
}

TEST(query_rotation_equals_key_rerotation) {
  kvtest::lcg rng(3);
  const int D = 64, T = 33, Hq = 2;
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / D));
  auto q = rng.vec(size_t(Hq * D)), k = rng.vec(size_t(T * D)), v = rng.vec(k.size());
  const int64_t delta = 137;
  // keys re-rotated by -delta, attended with the plain query
  std::vector<float> kr(k);
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < D / 2; ++i) {
      const double a = -static_cast<double>(delta) * inv[i];
      const float x = k[t * D + i], y = k[t * D + i + D / 2];
      kr[t * D + i] = static_cast<float>(x * std::cos(a) - y * std::sin(a));
      kr[t * D + i + D / 2] = static_cast<float>(y * std::cos(a) + x * std::sin(a));
    }
  std::vector<float> out(q.size());
  dense_segment seg{view(k.data(), dtype::f32, {1, 1, T, D}), view(v.data(), dtype::f32, {1, 1, T, D}), &delta};
  decode_attention_dense(view(q.data(), dtype::f32, {1, Hq, D}), {seg}, view(out.data(), dtype::f32, {1, Hq, D}), 0.f,
                         rope_spec{inv.data(), D / 2});
  CHECK(max_err(out, naive(q, kr, v, Hq, 1, T, D)) <= 1e-4);
}

TEST(attention_bad_input) {
  std::vector<float> buf(4096);
  dense_segment seg{view(buf.data(), dtype::f32, {1, 3, 4, 8}), view(buf.data(), dtype::f32, {1, 3, 4, 8}), nullptr};
  CHECK_THROWS(decode_attention_dense(view(buf.data(), dtype::f32, {1, 4, 8}), {seg},
                                      view(buf.data() + 2048, dtype::f32, {1, 4, 8}), 0.f, rope_spec{}),
               std::invalid_argument);  // 4 query heads, 3 kv heads
  CHECK_THROWS(decode_attention_dense(view(buf.data(), dtype::i32, {1, 3, 8}), {seg},
                                      view(buf.data() + 2048, dtype::f32, {1, 3, 8}), 0.f, rope_spec{}),
               type_error);
  CHECK_THROWS(decode_attention_dense(view(buf.data(), dtype::f32, {1, 3, 8}), {},
                                      view(buf.data() + 2048, dtype::f32, {1, 3, 8}), 0.f, rope_spec{}),
               std::invalid_argument);
}
