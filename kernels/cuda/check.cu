// Checks on a forward pass's results (prepended: common.cuh).

// out[0] = the index of the first NaN or infinity in x[0, n), or -1 when there is none.
// One block of 1024 threads: the decode step's look at its logits (200,064 floats for
// MiniMax-Text-01, still in L2 after the lm_head wrote them), run beside their copy to the
// host so that the host need not read them all once more before sampling. Thread t reads
// the 16-byte units t, t + 1024, ... without stopping at a hit, so its loads stay in flight
// together; the block then takes the smallest index any thread saw.
extern "C" __global__ void __launch_bounds__(1024) first_non_finite_f32(const float* x, int n, int* out) { PDL_ENTRY();
    const u32 exp_all = 0x7f800000u;  // NaN and infinity: every exponent bit set
    int first = 0x7fffffff;
    // whole 16-byte units when x is 16-byte aligned, single floats for the rest
    int units = ((size_t)x & 15) == 0 ? n / 4 : 0;
    const float4* x4 = (const float4*)x;
#pragma unroll 4
    for (int i = threadIdx.x; i < units; i += blockDim.x) {
        float4 v = x4[i];
        u32 bad = ((__float_as_uint(v.x) & exp_all) == exp_all ? 1u : 0u) | ((__float_as_uint(v.y) & exp_all) == exp_all ? 2u : 0u)
                | ((__float_as_uint(v.z) & exp_all) == exp_all ? 4u : 0u) | ((__float_as_uint(v.w) & exp_all) == exp_all ? 8u : 0u);
        if (bad) first = min(first, 4 * i + (__ffs(bad) - 1));
    }
    for (int i = 4 * units + threadIdx.x; i < n; i += blockDim.x)
        if ((__float_as_uint(x[i]) & exp_all) == exp_all) first = min(first, i);
    __shared__ int warp_first[32];
    first = __reduce_min_sync(0xffffffffu, first);
    if ((threadIdx.x & 31) == 0) warp_first[threadIdx.x >> 5] = first;
    __syncthreads();
    if (threadIdx.x < 32) {
        int w = threadIdx.x < (blockDim.x >> 5) ? warp_first[threadIdx.x] : 0x7fffffff;
        w = __reduce_min_sync(0xffffffffu, w);
        if (threadIdx.x == 0) out[0] = w == 0x7fffffff ? -1 : w;
    }
}
