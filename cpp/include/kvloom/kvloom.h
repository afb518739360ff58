// kvloom/kvloom.h — the embeddable C++ API of kvloom's core, in one include.
//
//   block_pool    fixed-size blocks of KV memory with reference counts   (block_pool.h)
//   cache         paged per-head KV cache: sequences, fork, rollback     (cache.h)
//   make_plan     eviction plans by name                                  (plan.h)
//   decode_attention_cache / _dense: CPU decode attention                 (attention.h)
//   tensor_view   non-owning strided tensors (DLPack-shaped)              (tensor_view.h)
//   devices       CPU or CUDA pools, the per-thread CUDA stream            (device.h)
//
// C callers (and other languages through a C FFI) use kvloom/c_api.h instead.
// Link with the CMake target kvloom::core (find_package(kvloom)).
#pragma once

#include "kvloom/attention.h"
#include "kvloom/block_pool.h"
#include "kvloom/cache.h"
#include "kvloom/common.h"
#include "kvloom/device.h"
#include "kvloom/plan.h"
#include "kvloom/tensor_view.h"
#include "kvloom/version.h"

namespace kvloom {
// The version of the library actually linked (KVLOOM_VERSION_STRING is the headers').
const char* version();
}  // namespace kvloom
