// Internal: hooks for kvloom's tests and benchmarks (not part of the embeddable API).
#pragma once

#include <cstddef>
#include <string>

namespace kvloom {

// Use the portable kernels even where faster ones run (tests compare both paths).
void force_generic_kernels(bool on);
// Caps the kernel path: "auto" (the best the CPU runs), "avx2" (no AVX-512), "generic".
void force_isa(const std::string& isa);

// Reads every byte of `bytes` with all kernel threads (returns a checksum); the benchmarks
// measure the machine's read bandwidth with it, with the same threads the kernels use.
double read_probe(const void* data, size_t bytes);

}  // namespace kvloom
