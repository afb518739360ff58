// Internal: one sequence of a cache — its head stores and the marks of the operations using
// it (cache::use_scope). Shared by cache.cpp and snapshot.cpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "head_store.h"
#include "kvloom/cache.h"

namespace kvloom {

struct cache::sequence {
  std::vector<head_store> heads;         // [n_layers * n_kv_heads]
  std::atomic<int32_t> users{0};         // > 0: readers in progress, -1: a writer
  std::atomic<const char*> op{nullptr};  // what the current (or last) user does, for messages
  sequence() = default;
  sequence(const sequence& o) : heads(o.heads) {}  // a fork copies the data, not the use marks
};

}  // namespace kvloom
