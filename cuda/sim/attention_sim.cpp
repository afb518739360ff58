// CUDA attention compiled as C++ against the host simulator (KVLOOM_CUDA_SIM; see cuda_runtime.h here).
#include "../attention.cu"
