// The qualifier of the torch-free math shared by the CPU kernels, the CUDA kernels and the CPU
// emulation of the CUDA kernels: one definition compiled for the host and the device.
#pragma once

#if defined(__CUDACC__)
#define L2L_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernels are compiled per instruction set (#pragma GCC target); inlined
// into them, this math is compiled for their vector width instead of the baseline's.
#define L2L_HD inline __attribute__((always_inline))
#else
#define L2L_HD inline
#endif
