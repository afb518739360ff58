// The C API (kvloom/c_api.h): handles over the C++ objects, exceptions turned into status
// codes and a thread-local message.
#include "kvloom/c_api.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvloom/attention.h"
#include "kvloom/kvloom.h"

struct kvloom_pool {
  std::shared_ptr<kvloom::block_pool> pool;
};

struct kvloom_cache {
  std::unique_ptr<kvloom::cache> cache;
};

namespace {

thread_local std::string g_error;

template <class F>
kvloom_status guarded(F&& f) {
  g_error.clear();
  try {
    f();
    return KVLOOM_OK;
  } catch (const kvloom::capacity_error& e) {
    g_error = e.what();
    return KVLOOM_ERR_CAPACITY;
  } catch (const kvloom::concurrent_use_error& e) {
    g_error = e.what();
    return KVLOOM_ERR_CONCURRENT;
  } catch (const kvloom::type_error& e) {
    g_error = e.what();
    return KVLOOM_ERR_TYPE;
  } catch (const std::out_of_range& e) {
    g_error = e.what();
    return KVLOOM_ERR_INDEX;
  } catch (const std::invalid_argument& e) {
    g_error = e.what();
    return KVLOOM_ERR_VALUE;
  } catch (const std::exception& e) {
    g_error = e.what();
    return KVLOOM_ERR_INTERNAL;
  } catch (...) {
    g_error = "unknown error";
    return KVLOOM_ERR_INTERNAL;
  }
}

void need(const void* p, const char* what) {
  if (!p) kvloom::fail_value(std::string(what) + " must not be NULL");
}

kvloom::dtype to_dtype(kvloom_dtype t) {
  switch (t) {
    case KVLOOM_F32: return kvloom::dtype::f32;
    case KVLOOM_F16: return kvloom::dtype::f16;
    case KVLOOM_BF16: return kvloom::dtype::bf16;
    default: break;
  }
  kvloom::fail_type("unknown kvloom_dtype " + std::to_string(static_cast<int>(t)));
}

kvloom::tensor_view contiguous(const void* data, kvloom_dtype t, std::vector<int64_t> shape) {
  kvloom::tensor_view v;
  v.data = const_cast<void*>(data);
  v.type = to_dtype(t);
  v.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    if (shape[d] < 0) kvloom::fail_value("negative tensor size");
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

}  // namespace

extern "C" {

const char* kvloom_version(void) { return kvloom::version(); }
const char* kvloom_last_error(void) { return g_error.c_str(); }

kvloom_status kvloom_pool_create(kvloom_dtype dtype, int head_dim, int block_size, int64_t capacity_blocks,
                                 kvloom_pool** out) {
  return guarded([&] {
    need(out, "out");
    auto pool = std::make_shared<kvloom::block_pool>(to_dtype(dtype), head_dim, block_size, capacity_blocks);
    *out = new kvloom_pool{std::move(pool)};
  });
}

void kvloom_pool_release(kvloom_pool* pool) { delete pool; }

kvloom_status kvloom_pool_block_bytes(const kvloom_pool* pool, size_t* out) {
  return guarded([&] {
    need(pool, "pool");
    need(out, "out");
    *out = pool->pool->block_bytes();
  });
}

kvloom_status kvloom_cache_create(kvloom_pool* pool, int n_layers, int n_kv_heads, const char* policy,
                                  const char* const* param_keys, const double* param_values, int n_params,
                                  kvloom_cache** out) {
  return guarded([&] {
    need(pool, "pool");
    need(out, "out");
    if (n_params < 0) kvloom::fail_value("n_params must be >= 0");
    if (n_params > 0) {
      need(param_keys, "param_keys");
      need(param_values, "param_values");
    }
    kvloom::plan_params params;
    for (int i = 0; i < n_params; ++i) {
      need(param_keys[i], "a parameter key");
      params.set(param_keys[i], param_values[i]);
    }
    auto plan = kvloom::make_plan(policy ? policy : "full", params);
    auto c = std::make_unique<kvloom::cache>(pool->pool, n_layers, n_kv_heads, std::move(plan));
    *out = new kvloom_cache{std::move(c)};
  });
}

void kvloom_cache_destroy(kvloom_cache* cache) { delete cache; }

int kvloom_policy_count(void) { return static_cast<int>(kvloom::plan_names().size()); }

const char* kvloom_policy_name(int index) {
  static const std::vector<std::string> names = kvloom::plan_names();
  if (index < 0 || index >= static_cast<int>(names.size())) return nullptr;
  return names[static_cast<size_t>(index)].c_str();
}

kvloom_status kvloom_seq_add(kvloom_cache* cache, int64_t* out_seq) {
  return guarded([&] {
    need(cache, "cache");
    need(out_seq, "out_seq");
    *out_seq = cache->cache->seq_add();
  });
}

kvloom_status kvloom_seq_fork(kvloom_cache* cache, int64_t seq, int64_t* out_seq) {
  return guarded([&] {
    need(cache, "cache");
    need(out_seq, "out_seq");
    *out_seq = cache->cache->seq_fork(seq);
  });
}

kvloom_status kvloom_seq_drop(kvloom_cache* cache, int64_t seq) {
  return guarded([&] {
    need(cache, "cache");
    cache->cache->seq_drop(seq);
  });
}

kvloom_status kvloom_seq_rollback(kvloom_cache* cache, int64_t seq, int64_t n_tokens) {
  return guarded([&] {
    need(cache, "cache");
    cache->cache->seq_rollback(seq, n_tokens);
  });
}

kvloom_status kvloom_seq_length(const kvloom_cache* cache, int64_t seq, int64_t* out) {
  return guarded([&] {
    need(cache, "cache");
    need(out, "out");
    *out = cache->cache->seq_length(seq);
  });
}

kvloom_status kvloom_append(kvloom_cache* cache, int layer, int64_t seq, const void* k, const void* v,
                            kvloom_dtype dtype, int64_t n_tokens) {
  return guarded([&] {
    need(cache, "cache");
    need(k, "k");
    need(v, "v");
    const kvloom::cache& c = *cache->cache;
    const auto kt = contiguous(k, dtype, {c.n_kv_heads(), n_tokens, c.head_dim()});
    const auto vt = contiguous(v, dtype, {c.n_kv_heads(), n_tokens, c.head_dim()});
    cache->cache->append(layer, seq, kt, vt, nullptr);
  });
}

kvloom_status kvloom_apply_policy(kvloom_cache* cache, int layer, int64_t seq, int64_t* out_freed) {
  return guarded([&] {
    need(cache, "cache");
    const int64_t n = cache->cache->apply_policy(layer, seq);
    if (out_freed) *out_freed = n;
  });
}

kvloom_status kvloom_cache_set_budget(kvloom_cache* cache, double fraction) {
  return guarded([&] {
    need(cache, "cache");
    cache->cache->set_budget(fraction);
  });
}

kvloom_status kvloom_attend(const kvloom_cache* cache, int layer, const int64_t* seqs, int64_t batch, const void* q,
                            kvloom_dtype dtype, int n_q_heads, void* out, float scale) {
  return guarded([&] {
    need(cache, "cache");
    need(q, "q");
    need(out, "out");
    if (batch < 0) kvloom::fail_value("batch must be >= 0");
    if (batch > 0) need(seqs, "seqs");
    const kvloom::cache& c = *cache->cache;
    std::vector<std::vector<kvloom::cache_segment>> views;
    for (int64_t b = 0; b < batch; ++b) views.push_back({kvloom::cache_segment{seqs[b], 0}});
    const auto qt = contiguous(q, dtype, {batch, n_q_heads, c.head_dim()});
    const auto ot = contiguous(out, dtype, {batch, n_q_heads, c.head_dim()});
    kvloom::decode_attention_cache(c, layer, views, qt, ot, scale, kvloom::rope_spec{});
  });
}

kvloom_status kvloom_head_length(const kvloom_cache* cache, int layer, int head, int64_t seq, int64_t* out) {
  return guarded([&] {
    need(cache, "cache");
    need(out, "out");
    *out = cache->cache->length(layer, head, seq);
  });
}

kvloom_status kvloom_seq_export(const kvloom_cache* cache, const int64_t* seqs, int64_t n, void** out_data,
                                size_t* out_size) {
  return guarded([&] {
    need(cache, "cache");
    need(out_data, "out_data");
    need(out_size, "out_size");
    if (n < 0) kvloom::fail_value("n must be >= 0");
    if (n > 0) need(seqs, "seqs");
    const std::vector<uint8_t> blob = cache->cache->export_sequences(std::vector<int64_t>(seqs, seqs + n));
    void* p = std::malloc(blob.empty() ? 1 : blob.size());
    if (!p) throw std::bad_alloc();
    std::memcpy(p, blob.data(), blob.size());
    *out_data = p;
    *out_size = blob.size();
  });
}

kvloom_status kvloom_seq_import(kvloom_cache* cache, const void* data, size_t size, int keep_ids, int64_t* out_seqs,
                                int64_t capacity, int64_t* out_count) {
  return guarded([&] {
    need(cache, "cache");
    need(out_count, "out_count");
    if (size > 0) need(data, "data");
    if (capacity > 0) need(out_seqs, "out_seqs");
    const auto* bytes = static_cast<const uint8_t*>(data);
    // the sequence count sits after the header; import checks it, but the caller's room for
    // ids must be known first: import into a scratch list, then copy (all or nothing)
    const std::vector<int64_t> ids = cache->cache->import_sequences(bytes, size, keep_ids != 0);
    *out_count = static_cast<int64_t>(ids.size());
    if (static_cast<int64_t>(ids.size()) > capacity) {
      for (int64_t id : ids) cache->cache->seq_drop(id);
      kvloom::fail_value("out_seqs has room for " + std::to_string(capacity) + " ids, the snapshot holds " +
                         std::to_string(ids.size()) + "; nothing was imported");
    }
    std::copy(ids.begin(), ids.end(), out_seqs);
  });
}

void kvloom_free(void* p) { std::free(p); }

kvloom_status kvloom_memory_bytes(const kvloom_cache* cache, size_t* out) {
  return guarded([&] {
    need(cache, "cache");
    need(out, "out");
    *out = cache->cache->memory_bytes();
  });
}

}  // extern "C"
