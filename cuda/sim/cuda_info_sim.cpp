// The CUDA self-test compiled as C++ against the host simulator (KVLOOM_CUDA_SIM).
#include "../cuda_info.cu"
