#pragma once

// FUSEDLR_HD marks the functions shared by the CPU and CUDA backends: the one definition of every
// schedule and update formula in the project.
#if defined(__CUDACC__)
#define FUSEDLR_HD __host__ __device__ __forceinline__
#else
#define FUSEDLR_HD inline
#endif
