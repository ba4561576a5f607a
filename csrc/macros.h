#pragma once

// FUSEDLR_HD marks the functions shared by the CPU and CUDA backends: the one definition of every
// schedule and update formula in the project.
#if defined(__CUDACC__)
#define FUSEDLR_HD __host__ __device__ __forceinline__
#else
// always_inline: the element loops of the CPU kernels vectorize only where every function of an
// element's update is inlined into them, which a big unit's inlining budget does not promise
#define FUSEDLR_HD inline __attribute__((always_inline))
#endif
