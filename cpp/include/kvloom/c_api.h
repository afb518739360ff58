/* kvloom/c_api.h — a small, stable C API over kvloom's core, for stacks written in C, Rust,
 * Go or anything with a C FFI.
 *
 * Conventions
 *   - Objects are opaque handles. kvloom_pool_create / kvloom_cache_create return a new
 *     handle; release it with kvloom_pool_release / kvloom_cache_destroy. A cache keeps its
 *     pool alive, so a pool handle may be released right after the caches are made.
 *   - Every function that can fail returns a kvloom_status; KVLOOM_OK (0) is success. On
 *     failure kvloom_last_error() returns a message naming what was wrong (valid until the
 *     next kvloom call on the same thread), and every object is exactly as it was before
 *     the call.
 *   - Tensors are contiguous row-major buffers in the stated layout; `dtype` gives their
 *     element type (KVLOOM_F32, KVLOOM_F16, KVLOOM_BF16).
 *   - Thread safety as in kvloom/cache.h: sequence creation, fork and drop need exclusive
 *     access to a cache; appends, policy runs and attention on different sequences may run
 *     on different threads at once.
 */
#ifndef KVLOOM_C_API_H
#define KVLOOM_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvloom_pool kvloom_pool;
typedef struct kvloom_cache kvloom_cache;

typedef enum kvloom_status {
  KVLOOM_OK = 0,
  KVLOOM_ERR_VALUE = 1,    /* a bad argument (shape, range, unknown name) */
  KVLOOM_ERR_INDEX = 2,    /* a layer, head or sequence that does not exist */
  KVLOOM_ERR_TYPE = 3,     /* a dtype the call does not take */
  KVLOOM_ERR_CAPACITY = 4, /* the pool is full: nothing was changed */
  KVLOOM_ERR_INTERNAL = 5, /* anything else (e.g. out of system memory) */
  KVLOOM_ERR_CONCURRENT = 6, /* another thread was using the same sequence: nothing was done */
  KVLOOM_STATUS_MAX_ENUM = 0x7fffffff
} kvloom_status;

/* (The _MAX_ENUM members make every int value a valid enum value, so a bad value passed
 * from another language is reported as an error instead of being undefined behaviour.) */
typedef enum kvloom_dtype { KVLOOM_F32 = 0, KVLOOM_F16 = 1, KVLOOM_BF16 = 2, KVLOOM_DTYPE_MAX_ENUM = 0x7fffffff } kvloom_dtype;

/* "0.1.0": the linked library's version. */
const char* kvloom_version(void);
/* The message of the last failed call on this thread ("" if none). */
const char* kvloom_last_error(void);

/* A pool of blocks of `block_size` tokens x `head_dim` (keys and values) in `dtype`, at most
 * `capacity_blocks` blocks (memory is reserved in chunks as it is needed). */
kvloom_status kvloom_pool_create(kvloom_dtype dtype, int head_dim, int block_size, int64_t capacity_blocks,
                                 kvloom_pool** out);
void kvloom_pool_release(kvloom_pool* pool);
kvloom_status kvloom_pool_block_bytes(const kvloom_pool* pool, size_t* out);

/* A cache of n_layers x n_kv_heads head stores per sequence whose heads start with the
 * eviction policy `policy` ("full", "window", "heavy_hitter", "nats", ... see
 * kvloom_policy_name), configured by n_params (key, value) pairs, e.g.
 * {"sinks", "recent"} = {4, 1024} for "window". policy NULL means "full". */
kvloom_status kvloom_cache_create(kvloom_pool* pool, int n_layers, int n_kv_heads, const char* policy,
                                  const char* const* param_keys, const double* param_values, int n_params,
                                  kvloom_cache** out);
void kvloom_cache_destroy(kvloom_cache* cache);

/* The policies kvloom_cache_create accepts: index 0..kvloom_policy_count()-1. */
int kvloom_policy_count(void);
const char* kvloom_policy_name(int index);

kvloom_status kvloom_seq_add(kvloom_cache* cache, int64_t* out_seq);
/* A new sequence sharing every block of `seq` (copy-on-write). */
kvloom_status kvloom_seq_fork(kvloom_cache* cache, int64_t seq, int64_t* out_seq);
kvloom_status kvloom_seq_drop(kvloom_cache* cache, int64_t seq);
/* Forgets the last n_tokens appended tokens of `seq`. */
kvloom_status kvloom_seq_rollback(kvloom_cache* cache, int64_t seq, int64_t n_tokens);
/* Tokens ever appended to `seq` (evicted ones included). */
kvloom_status kvloom_seq_length(const kvloom_cache* cache, int64_t seq, int64_t* out);

/* Appends n_tokens tokens to every kv head of (layer, seq): k and v are
 * [n_kv_heads, n_tokens, head_dim] in `dtype`; positions are the logical token indices. */
kvloom_status kvloom_append(kvloom_cache* cache, int layer, int64_t seq, const void* k, const void* v,
                            kvloom_dtype dtype, int64_t n_tokens);
/* Runs the policy of every head of (layer, seq); *out_freed (may be NULL) = tokens freed. */
kvloom_status kvloom_apply_policy(kvloom_cache* cache, int layer, int64_t seq, int64_t* out_freed);
/* A byte budget: after each kvloom_apply_policy a layer of a sequence holds at most `fraction`
 * of the bytes Full would hold for the tokens appended (never less than one block per head);
 * tokens give way by each policy's rule (README "Memory budget"). 0 = no budget. */
kvloom_status kvloom_cache_set_budget(kvloom_cache* cache, double fraction);
/* Decode attention: q and out are [batch, n_q_heads, head_dim] in `dtype`; row b attends to
 * seqs[b] at `layer`. n_q_heads must be a multiple of the cache's kv heads (GQA/MQA).
 * scale <= 0 means 1/sqrt(head_dim). */
kvloom_status kvloom_attend(const kvloom_cache* cache, int layer, const int64_t* seqs, int64_t batch, const void* q,
                            kvloom_dtype dtype, int n_q_heads, void* out, float scale);

/* Live tokens of one kv head. */
kvloom_status kvloom_head_length(const kvloom_cache* cache, int layer, int head, int64_t seq, int64_t* out);
/* Exact bytes of KV held by the cache (live blocks x block bytes). */
kvloom_status kvloom_memory_bytes(const kvloom_cache* cache, size_t* out);

/* Snapshots (format: README "Snapshots"; the blob has no checksum: store it with one).
 * kvloom_seq_export: *out_data (free it with kvloom_free) and *out_size = the n sequences.
 * kvloom_seq_import: checks the whole blob against the cache before changing anything, then
 * adds its sequences; their ids go to out_seqs (room for `capacity` ids; *out_count = how
 * many the blob holds; KVLOOM_ERR_VALUE, nothing imported, if capacity is too small).
 * keep_ids != 0 reuses the saved ids (they must be beyond every id the cache has given). */
kvloom_status kvloom_seq_export(const kvloom_cache* cache, const int64_t* seqs, int64_t n, void** out_data,
                                size_t* out_size);
kvloom_status kvloom_seq_import(kvloom_cache* cache, const void* data, size_t size, int keep_ids, int64_t* out_seqs,
                                int64_t capacity, int64_t* out_count);
void kvloom_free(void* p);

#ifdef __cplusplus
}
#endif

#endif /* KVLOOM_C_API_H */
