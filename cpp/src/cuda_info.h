// Internal: the CUDA side (built when KVLOOM_WITH_CUDA is defined).
#pragma once

#include <cstdint>

namespace kvloom {
namespace cuda {

int device_count();  // 0 when no driver or device
// Round-trips the shared bf16 -> f32 conversion through a device kernel (self-test).
bool widen_bf16_on_device(const uint16_t* host_in, float* host_out, int n);

}  // namespace cuda
}  // namespace kvloom
