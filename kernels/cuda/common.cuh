// Shared by every mxr kernel source: fixed-width types, f16/bf16 conversions without CUDA
// headers (NVRTC compiles these files with no include path), and warp reductions.
// The Rust side prepends this file to each .cu source before compiling it.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// First statement of every kernel: programmatic dependent launch. In a graph whose
// kernel-to-kernel edges are programmatic (Gpu::capture with MXR_PDL), a kernel's blocks may
// start while the kernel before it finishes; griddepcontrol.wait holds them until that
// kernel has completed and its writes are visible (and returns at once without such an
// edge), and launch_dependents then lets the next kernel's blocks start early in turn.
#if __CUDA_ARCH__ >= 900
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT()
#define PDL_LAUNCH()
#endif
#if defined(TIMELINE) && TIMELINE
// MXR_TIMELINE=1 (kernels/src/cuda/timeline.rs): the first block of every kernel stamps
// the global timer when it starts and when its wait returns, into the next of the slots
// `mxr_timeline` points at ([0] the count, [1] the capacity, then a pair per kernel).
__device__ u64* mxr_timeline = nullptr;
__device__ __forceinline__ u64 global_timer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void pdl_entry_stamped() {
    u64 start = global_timer();
    PDL_WAIT();
    if (mxr_timeline && threadIdx.x == 0 && threadIdx.y == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        u64 release = global_timer();
        u64 i = atomicAdd(mxr_timeline, 1ull);
        if (i < mxr_timeline[1]) {
            mxr_timeline[2 + 2 * i] = start;
            mxr_timeline[3 + 2 * i] = release;
        }
    }
    PDL_LAUNCH();
}
#define PDL_ENTRY() pdl_entry_stamped()
#elif __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY()
#endif

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, NaN kept quiet (as torch and ggml do).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 load_u16(const u8* p) { return (u16)p[0] | ((u16)p[1] << 8); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread
// gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// Maximum over a block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : __int_as_float(0xff800000);
    return warp_max(v);
}

// One 32-value block of activations to int8 as ggml's quantize_row_q8_0 (one warp, value
// v per lane): d = max|x| / 127, q = roundf(x / d) with the f32 inverse of d, d rounded to
// f16 and stored as that f16's f32 value.
__device__ __forceinline__ void quantize_block32(float v, int lane, i8* q, float* d) {
    float amax = warp_max(fabsf(v));
    float dd = amax / 127.f;
    float id = dd != 0.f ? 1.f / dd : 0.f;
    q[lane] = (i8)roundf(v * id);
    if (lane == 0) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(dd));
        *d = f16_to_f32(h);
    }
}

// Element j (< head_dim) of one head's row p after partial NeoX RoPE, given the row of the
// rotation table for its position (cs[i] = (cos, sin) of pair i, attention.cu's
// rope_table): exactly what attention.cu's rope writes there. rd = 0: no rotation.
__device__ __forceinline__ float roped(const float* p, int j, int rd, const float2* cs) {
    int half = rd >> 1;
    if (j >= rd) return p[j];
    int i = j < half ? j : j - half;
    float2 r = cs[i];
    float a = p[i], b = p[i + half];
    return j < half ? a * r.x - b * r.y : b * r.x + a * r.y;
}

// A load that bypasses L1: for values other blocks wrote during this kernel, read by the
// block that counted them all done (tickets; see moe.cu's route_fused).
__device__ __forceinline__ float load_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// alpha x + beta a, rounded as every residual in mxr rounds it: one fused multiply-add,
// written out so that the residual kernel and the norms that fold the residual in give the
// same bits (left to the compiler, the two contracted it differently).
__device__ __forceinline__ float mix(float x, float alpha, float a, float beta) { return fmaf(x, alpha, a * beta); }
__device__ __forceinline__ float4 mix4(float4 x, float alpha, float4 a, float beta) {
    return make_float4(mix(x.x, alpha, a.x, beta), mix(x.y, alpha, a.y, beta), mix(x.z, alpha, a.z, beta), mix(x.w, alpha, a.w, beta));
}

// Σ_j w[t * k + j] * y[(t * k + j) * width + c]: token t's k expert outputs at column c,
// combined with its routing weights (moe_combine, and the norm that takes them instead).
__device__ __forceinline__ float combine_at(const float* y, const float* w, int k, int width, int t, int c) {
    float acc = 0.f;
    for (int j = 0; j < k; j++) acc += w[t * k + j] * y[((size_t)t * k + j) * width + c];
    return acc;
}

// The same for four consecutive columns c..c+3 (c a multiple of 4, width too), 16 bytes a
// load, each column's sum in the same order as combine_at's.
__device__ __forceinline__ float4 combine4_at(const float* y, const float* w, int k, int width, int t, int c) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < k; j++) {
        float wj = w[t * k + j];
        float4 v = *(const float4*)(y + ((size_t)t * k + j) * width + c);
        acc.x += wj * v.x;
        acc.y += wj * v.y;
        acc.z += wj * v.z;
        acc.w += wj * v.w;
    }
    return acc;
}

// The last block to finish a piece of work shared by `expected` blocks: each block calls
// this after writing its part (all threads); it returns true in every thread of the one
// block that arrived last, which then reads the others' parts (load_cg). The ticket is left
// at 0 for the next launch (and the next replay of a graph). As a grid barrier does it: the
// block's barrier, then one thread's fence orders all the block's writes before its ticket.
__device__ __forceinline__ bool arrived_last(unsigned* ticket, unsigned expected) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(ticket, 1u) == expected - 1;
        if (last) {
            *ticket = 0;
            __threadfence();
        }
    }
    __syncthreads();
    return last;
}

// Shared memory: a generic pointer's shared-window address, and copies into it.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared without passing through registers; `ok` false zero-fills
// (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
// the same to a 32-bit shared-window address
__device__ __forceinline__ void cp_async16_s(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
// 4 bytes (zeros when !ok); cp.async's .ca form, the one that takes sizes under 16
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
