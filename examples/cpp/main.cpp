// A tiny embedder of kvloom's C++ API: a 2-layer cache with StreamingLLM eviction, 20
// tokens per layer, then one decode-attention step (GQA: 4 query heads over 2 kv heads).
// Prints the live tokens per head, the bytes held and the attention output.
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include <kvloom/kvloom.h>

namespace {

constexpr int kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 16, kTokens = 20;

kvloom::tensor_view view(void* data, std::vector<int64_t> shape) {
  kvloom::tensor_view v;
  v.data = data;
  v.type = kvloom::dtype::f32;
  v.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

}  // namespace

int main() {
  std::printf("kvloom %s\n", kvloom::version());
  auto pool = std::make_shared<kvloom::block_pool>(kvloom::dtype::f32, kDim, 4, 1024);
  auto window = kvloom::make_plan("window", kvloom::plan_params().set("sinks", 2).set("recent", 6));
  kvloom::cache cache(pool, kLayers, kHeads, window);
  const int64_t seq = cache.seq_add();
  std::vector<float> k(kHeads * kTokens * kDim), v(k.size());
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h)
      for (int t = 0; t < kTokens; ++t)
        for (int d = 0; d < kDim; ++d) {
          const size_t i = (static_cast<size_t>(h) * kTokens + t) * kDim + d;
          k[i] = static_cast<float>(std::sin(0.1 * (t + 1) + 0.37 * d + h + l));
          v[i] = static_cast<float>(std::cos(0.05 * (t + 1) * (d + 1) - h - l));
        }
    cache.append(l, seq, view(k.data(), {kHeads, kTokens, kDim}), view(v.data(), {kHeads, kTokens, kDim}), nullptr);
    cache.apply_policy(l, seq);
  }
  std::printf("lengths:");
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kHeads; ++h) std::printf(" %lld", static_cast<long long>(cache.length(l, h, seq)));
  std::printf("\nmemory_bytes: %zu\n", cache.memory_bytes());
  std::vector<float> q(kQHeads * kDim), out(q.size());
  for (int g = 0; g < kQHeads; ++g)
    for (int d = 0; d < kDim; ++d) q[g * kDim + d] = static_cast<float>(std::sin(0.3 * g + 0.11 * d));
  kvloom::decode_attention_cache(cache, 1, {{kvloom::cache_segment{seq, 0}}}, view(q.data(), {1, kQHeads, kDim}),
                                 view(out.data(), {1, kQHeads, kDim}), 0.f, kvloom::rope_spec{});
  std::printf("out:");
  for (float x : out) std::printf(" %.6f", x);
  std::printf("\n");
  return 0;
}
