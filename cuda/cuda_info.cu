// The CUDA target. Kernels mirroring the CPU ones land here; for now it proves the CUDA
// toolchain builds against the shared headers (the fp16/bf16 math in common.h is
// __host__ __device__) and reports what the runtime sees.
#include "cuda_info.h"
#include "kvloom/common.h"
#include "launch.h"

namespace kvloom {
namespace cuda {

namespace {
__global__ void widen_bf16(const uint16_t* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = bf16_to_f32(in[i]);
}
}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

bool widen_bf16_on_device(const uint16_t* host_in, float* host_out, int n) {
  if (n <= 0) return true;
  uint16_t* din = nullptr;
  float* dout = nullptr;
  bool ok = cudaMalloc(&din, sizeof(uint16_t) * n) == cudaSuccess && cudaMalloc(&dout, sizeof(float) * n) == cudaSuccess &&
            cudaMemcpy(din, host_in, sizeof(uint16_t) * n, cudaMemcpyHostToDevice) == cudaSuccess;
  if (ok) {
    KVLOOM_LAUNCH(widen_bf16, (n + 255) / 256, 256, 0, nullptr)(din, dout, n);
    ok = cudaGetLastError() == cudaSuccess &&
         cudaMemcpy(host_out, dout, sizeof(float) * n, cudaMemcpyDeviceToHost) == cudaSuccess;
  }
  cudaFree(din);
  cudaFree(dout);
  return ok;
}

}  // namespace cuda
}  // namespace kvloom
