// Host/device qualifiers so the same math compiles in the C++ CPU build and under nvcc.
#pragma once
#if defined(__CUDACC__)
#define MKF_HD __host__ __device__ __forceinline__
#else
#define MKF_HD inline
#endif
