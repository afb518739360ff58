/* The C API (kvloom/c_api.h) doing what examples/cpp does: a 2-layer cache with StreamingLLM
 * eviction, 20 tokens per layer, one decode-attention step; same output format. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <kvloom/c_api.h>

#define LAYERS 2
#define HEADS 2
#define QHEADS 4
#define DIM 16
#define TOKENS 20

static void check(kvloom_status st, const char* what) {
  if (st != KVLOOM_OK) {
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)st, kvloom_last_error());
    exit(1);
  }
}

int main(void) {
  static float k[HEADS * TOKENS * DIM], v[HEADS * TOKENS * DIM], q[QHEADS * DIM], out[QHEADS * DIM];
  const char* keys[] = {"sinks", "recent"};
  const double values[] = {2, 6};
  kvloom_pool* pool = NULL;
  kvloom_cache* cache = NULL;
  int64_t seq = -1, len = 0;
  size_t bytes = 0;
  int l, h, t, d, g;

  printf("kvloom %s\n", kvloom_version());
  check(kvloom_pool_create(KVLOOM_F32, DIM, 4, 1024, &pool), "pool_create");
  check(kvloom_cache_create(pool, LAYERS, HEADS, "window", keys, values, 2, &cache), "cache_create");
  kvloom_pool_release(pool); /* the cache keeps the pool alive */
  check(kvloom_seq_add(cache, &seq), "seq_add");
  for (l = 0; l < LAYERS; ++l) {
    for (h = 0; h < HEADS; ++h)
      for (t = 0; t < TOKENS; ++t)
        for (d = 0; d < DIM; ++d) {
          const int i = (h * TOKENS + t) * DIM + d;
          k[i] = (float)sin(0.1 * (t + 1) + 0.37 * d + h + l);
          v[i] = (float)cos(0.05 * (t + 1) * (d + 1) - h - l);
        }
    check(kvloom_append(cache, l, seq, k, v, KVLOOM_F32, TOKENS), "append");
    check(kvloom_apply_policy(cache, l, seq, NULL), "apply_policy");
  }
  printf("lengths:");
  for (l = 0; l < LAYERS; ++l)
    for (h = 0; h < HEADS; ++h) {
      check(kvloom_head_length(cache, l, h, seq, &len), "head_length");
      printf(" %lld", (long long)len);
    }
  check(kvloom_memory_bytes(cache, &bytes), "memory_bytes");
  printf("\nmemory_bytes: %zu\n", bytes);
  for (g = 0; g < QHEADS; ++g)
    for (d = 0; d < DIM; ++d) q[g * DIM + d] = (float)sin(0.3 * g + 0.11 * d);
  check(kvloom_attend(cache, 1, &seq, 1, q, KVLOOM_F32, QHEADS, out, 0.f), "attend");
  printf("out:");
  for (g = 0; g < QHEADS * DIM; ++g) printf(" %.6f", out[g]);
  printf("\n");
  /* a misuse is an error code and a message, never a crash */
  if (kvloom_head_length(cache, 9, 0, seq, &len) != KVLOOM_ERR_INDEX) return 2;
  printf("error: %s\n", kvloom_last_error());
  kvloom_cache_destroy(cache);
  return 0;
}
