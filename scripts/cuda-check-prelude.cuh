// Declarations of the CUDA built-ins the kernels use, for `scripts/cuda-check.sh`: clang
// parses and type-checks the device code for NVPTX without the CUDA toolkit (CI has no
// GPU and no CUDA). NVRTC provides the real ones; nothing here is compiled into mxr.
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __attribute__((always_inline)) inline
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
extern const __device__ uint3 threadIdx; extern const __device__ uint3 blockIdx; extern const __device__ dim3 blockDim; extern const __device__ dim3 gridDim;
struct int4 { int x, y, z, w; }; struct uint4 { unsigned x, y, z, w; }; struct uint2 { unsigned x, y; }; struct int2 { int x, y; }; struct float4 { float x, y, z, w; }; struct float2 { float x, y; };
__device__ float4 make_float4(float, float, float, float); __device__ uint4 make_uint4(unsigned, unsigned, unsigned, unsigned); __device__ int4 make_int4(int,int,int,int); __device__ uint2 make_uint2(unsigned, unsigned); __device__ int2 make_int2(int, int); __device__ float2 make_float2(float, float);
__device__ int __dp4a(int, int, int); __device__ float __shfl_xor_sync(unsigned, float, int); __device__ int __shfl_xor_sync(unsigned, int, int);
__device__ float __shfl_sync(unsigned, float, int); __device__ float __int_as_float(int); __device__ unsigned __float_as_uint(float); __device__ float __uint_as_float(unsigned);
__device__ unsigned __byte_perm(unsigned, unsigned, unsigned); __device__ unsigned long __cvta_generic_to_shared(const void*);
__device__ int __float_as_int(float); __device__ void __syncthreads(); __device__ float expf(float); __device__ float exp2f(float); __device__ float fmaxf(float, float); __device__ float fminf(float, float);
__device__ float fmaf(float, float, float); __device__ float sqrtf(float); __device__ float rsqrtf(float); __device__ float fabsf(float); __device__ double pow(double, double); __device__ double cos(double); __device__ double sin(double);
__device__ float logf(float); __device__ float roundf(float); __device__ int min(int, int); __device__ int max(int, int); __device__ float atomicAdd(float*, float); __device__ unsigned atomicAdd(unsigned*, unsigned); __device__ float log2f(float);
typedef unsigned long size_t;
#define __align__(n) __attribute__((aligned(n)))
__device__ void __syncwarp(unsigned mask = 0xffffffffu);
__device__ int __all_sync(unsigned, int); __device__ int __reduce_min_sync(unsigned, int); __device__ int __ffs(int);
__device__ void __threadfence(); __device__ void __threadfence_system(); __device__ void __nanosleep(unsigned);
#define __grid_constant__
#define __cluster_dims__(...)
