// The CUDA backend compiled as C++ against the host simulator (KVLOOM_CUDA_SIM; see cuda_runtime.h here).
#include "../backend.cu"
