// The CUDA target (built only with KVLOOM_WITH_CUDA): on a machine with a GPU, the shared
// bf16 -> f32 conversion gives the same bits on the device as on the host. Without a
// device the test reports that and passes (CI has no GPU; a lent GPU machine runs it).
#include <cstdio>
#include <cstring>
#include <vector>

#include "kvloom/common.h"
#include "cuda_info.h"
#include "test.h"

TEST(cuda_bf16_widening_matches_host) {
  const int n = 1 << 16;
  std::vector<uint16_t> in(n);
  for (int i = 0; i < n; ++i) in[i] = static_cast<uint16_t>(i);  // every bf16 bit pattern
  if (kvloom::cuda::device_count() == 0) {
    std::printf("  (no CUDA device: skipped)\n");
    return;
  }
  std::vector<float> dev(n, -1.f);
  CHECK(kvloom::cuda::widen_bf16_on_device(in.data(), dev.data(), n));
  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const float host = kvloom::bf16_to_f32(in[i]);
    if (std::memcmp(&host, &dev[i], sizeof(float)) != 0) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
  std::printf("  CUDA devices: %d, %d bf16 patterns checked\n", kvloom::cuda::device_count(), n);
}
