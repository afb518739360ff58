// Kernel launches and dynamic shared memory, written once for nvcc and for the host simulator
// (cuda/sim, built with KVLOOM_CUDA_SIM): the simulator has no <<<...>>> syntax.
//
//   KVLOOM_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...);
//   KVLOOM_DYNAMIC_SMEM(float, sm);   // inside a kernel: float* sm = the dynamic shared memory
//   KVLOOM_UNROLL for (...)           // a loop over a compile-time bound, unrolled by nvcc
#pragma once

#include <cuda_runtime.h>

#ifdef KVLOOM_CUDA_SIM
#define KVLOOM_LAUNCH(kernel, grid, block, smem, stream) ::kvsim::launch(kernel, grid, block, smem, stream)
#define KVLOOM_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::kvsim::dynamic_smem())
#define KVLOOM_UNROLL
#else
#define KVLOOM_UNROLL _Pragma("unroll")
#define KVLOOM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define KVLOOM_DYNAMIC_SMEM(type, name)                      \
  extern __shared__ __align__(16) unsigned char kvloom_smem_[]; \
  type* name = reinterpret_cast<type*>(kvloom_smem_)
#endif
