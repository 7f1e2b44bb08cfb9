// Causal GQA prefill attention for head size 128 on Hopper's warpgroup tensor cores
// (wgmma; prepended: common.cuh, mma.cuh; compiled for sm_90a only). The same contract and
// arithmetic as flash.cu's flash_bf16_128 (q rotated and scaled for exp2 as it is read,
// rounded to bf16; bf16 K/V; f32 accumulators; online softmax), with the products issued
// per warpgroup instead of per warp:
//   S = Q K^T: wgmma m64n64k16, A = Q from registers (the mma.sync A fragment is the
//              wgmma one, warp w holding rows 16w..16w+15), B = the K tile in shared memory;
//   O += P V:  wgmma m64n64k16 twice (dims 0..63, 64..127), A = P from registers (the S
//              accumulator converted as flash.cu converts it), B = the V tile, transposed.
//
// Block = HPB warpgroups (4 warps each); warpgroup w takes 64 queries of head
// blockIdx.x * HPB + w. flash_wg_bf16_128 (HPB 1) has the grid of flash_bf16_128;
// flash_wg2_bf16_128 (HPB 2) pairs two heads of one KV group (the group size must be even),
// so each K/V tile crosses from L2 once for both. K and V tiles of 64 keys go through shared
// memory by cp.async, double-buffered, in the no-swizzle "core matrix" layout wgmma reads:
// element (key j, dim d) of a tile at
// (j / 8) * 1024 + (d / 8) * 64 + (j % 8) * 8 + d % 8 (bf16 elements). Core matrices of 8
// keys x 8 dims (128 bytes) lie 128 bytes apart along the dims and 2048 bytes apart along
// the keys; K is read K-major (dims are wgmma's K), V MN-major (dims are its N).

#ifndef FK
#define FK 64  // keys per tile, as flash.cu
#endif
#define WG_HD 128
#define WG_KEYS_STRIDE (WG_HD * 8)  // elements from one 8-key group to the next

// shared memory matrix descriptor, no swizzle: start, leading and stride byte offsets
__device__ __forceinline__ unsigned long long wg_desc(const u16* p, u32 lbo, u32 sbo) {
    unsigned long long a = smem_addr(p);
    return ((a & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) | ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// shared memory written by cp.async (the generic proxy) made visible to wgmma (the async proxy)
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// d (64x64 f32, this thread's 32: d[t][i] is the PTX fragment's element 4 t + i) += a (64x16 bf16, registers) * B (16x64 bf16, descriptor);
// TRANS_B: B is MN-major
template <int TRANS_B>
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[8][4], const u32 (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %38, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n"
        "}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TRANS_B), "r"(1));
}

// Starts copying keys j0 .. j0 + FK of KV head g into s in the core-matrix layout above
// (zeros past `end`). Whole block; complete after cp_async_wait and __syncthreads. Eight
// consecutive threads fill one core matrix (128 contiguous bytes: no bank conflicts); a
// warp reads 64 contiguous bytes of each of 8 keys.
__device__ void wg_stage(u16* s, const u16* c, int g, int kv_dim, int j0, int end) {
#pragma unroll
    for (int i = threadIdx.x; i < FK * WG_HD / 8; i += blockDim.x) {
        int r = i & 7, dc = (i >> 3) & (WG_HD / 8 - 1), jg = i / WG_HD;  // key in group, dim chunk, key group
        int j = jg * 8 + r;
        bool ok = j0 + j < end;
        cp_async16(s + jg * WG_KEYS_STRIDE + dc * 64 + r * 8, ok ? c + (size_t)(j0 + j) * kv_dim + (size_t)g * WG_HD + dc * 8 : c, ok);
    }
}

template <int HPB>
__device__ __forceinline__ void flash_wg(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads,
                                         int n_tokens, const int* pos, float scale, int rd, const float2* cs) {
    constexpr int KS = WG_HD / 16, ST = 2 * FK * WG_HD;  // k-steps of S; u16 per stage (K, V)
    extern __shared__ __align__(128) u16 smem[];
    const int h = blockIdx.x * HPB + (threadIdx.x >> 7), g = h / (n_heads / n_kv_heads);
    const int tile = gridDim.y - 1 - blockIdx.y;  // the longest tiles first
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;  // warp in the warpgroup
    const int pos0 = *pos, kv_dim = n_kv_heads * WG_HD, width = n_heads * WG_HD;
    const int r0 = tile * 64 + warp * 16 + gid, r1 = r0 + 8;  // this lane's two rows
    const int end = pos0 + min(n_tokens, tile * 64 + 64);      // keys any query of the block sees
    const float ninf = __int_as_float(0xff800000);

    const float* q0 = r0 < n_tokens ? q + (size_t)r0 * width + (size_t)h * WG_HD : nullptr;
    const float* q1 = r1 < n_tokens ? q + (size_t)r1 * width + (size_t)h * WG_HD : nullptr;
    u32 qf[KS][4];
    q_fragments<KS>(qf, q0, q1, cs + (size_t)r0 * (rd >> 1), cs + (size_t)r1 * (rd >> 1), WG_HD, rd, scale, tig);
    // o[half][t][i]: dims half * 64 + 8 t + 2 tig (+1), rows gid (i < 2) and gid + 8
    float o[2][8][4];
#pragma unroll
    for (int i = 0; i < 32; i++) o[0][i >> 2][i & 3] = o[1][i >> 2][i & 3] = 0.f;
    float m0 = ninf, m1 = ninf, l0 = 0.f, l1 = 0.f;

    const int n_tiles = (end + FK - 1) / FK;
    wg_stage(smem, kc, g, kv_dim, 0, end);
    wg_stage(smem + FK * WG_HD, vc, g, kv_dim, 0, end);
    cp_async_commit();
    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * FK;
        if (it + 1 < n_tiles) {
            u16* nx = smem + ((it + 1) & 1) * ST;
            wg_stage(nx, kc, g, kv_dim, j0 + FK, end);
            wg_stage(nx + FK * WG_HD, vc, g, kv_dim, j0 + FK, end);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_async_shared();
        __syncthreads();
        const u16* ks = smem + (it & 1) * ST;
        const u16* vs = ks + FK * WG_HD;
        // S = Q K^T over the 64 keys: k-step kk reads dims 16 kk .. (K-major: leading byte
        // offset 128 along the dims, stride byte offset 2048 along the keys)
        float s[8][4];  // the accumulator's d[4 nt + i] is s[nt][i]
#pragma unroll
        for (int i = 0; i < 32; i++) s[i >> 2][i & 3] = 0.f;
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < KS; kk++) wgmma_64x64x16<0>(s, qf[kk], wg_desc(ks + kk * 2 * 64, 128, WG_KEYS_STRIDE * 2));
        wg_commit();
        wg_wait_all();
        // causal mask and the online softmax, as flash.cu
        float c0, c1;
        u32 pf[FK / 16][4];
        softmax_tile<8>(s, j0, pos0 + r0, pos0 + r1, tig, m0, m1, l0, l1, c0, c1, pf);
#pragma unroll
        for (int t = 0; t < 16; t++) {
            o[t >> 3][t & 7][0] *= c0;
            o[t >> 3][t & 7][1] *= c0;
            o[t >> 3][t & 7][2] *= c1;
            o[t >> 3][t & 7][3] *= c1;
        }
        // O += P V: k-step kk reads keys 16 kk .. (MN-major: leading byte offset 2048 along
        // the keys, stride byte offset 128 along the dims); each half 64 dims
        wg_fence();
#pragma unroll
        for (int half = 0; half < 2; half++) {
#pragma unroll
            for (int kk = 0; kk < FK / 16; kk++)
                wgmma_64x64x16<1>(o[half], pf[kk], wg_desc(vs + kk * 2 * WG_KEYS_STRIDE + half * 8 * 64, WG_KEYS_STRIDE * 2, 128));
        }
        wg_commit();
        wg_wait_all();
        __syncthreads();  // before the next iteration refills this stage
    }
    quad_sum(l0, l1);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int t = 0; t < 16; t++) {
        int d = t * 8 + tig * 2;
        const float* v = o[t >> 3][t & 7];
        if (r0 < n_tokens) {
            float* p = out + (size_t)r0 * width + (size_t)h * WG_HD;
            p[d] = v[0] * i0;
            p[d + 1] = v[1] * i0;
        }
        if (r1 < n_tokens) {
            float* p = out + (size_t)r1 * width + (size_t)h * WG_HD;
            p[d] = v[2] * i1;
            p[d + 1] = v[3] * i1;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_wg_bf16_128(const float* q, const u16* kc, const u16* vc, float* out, int n_heads,
                                                                   int n_kv_heads, int n_tokens, int hd, const int* pos, float scale,
                                                                   int rd, const float2* cs) {
    flash_wg<1>(q, kc, vc, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs);
}

extern "C" __global__ void __launch_bounds__(256) flash_wg2_bf16_128(const float* q, const u16* kc, const u16* vc, float* out, int n_heads,
                                                                    int n_kv_heads, int n_tokens, int hd, const int* pos, float scale,
                                                                    int rd, const float2* cs) {
    flash_wg<2>(q, kc, vc, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs);
}
