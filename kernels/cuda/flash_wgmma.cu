// Causal GQA prefill attention for head size 128 on Hopper's warpgroup tensor cores
// (wgmma; prepended: common.cuh, mma.cuh; compiled for sm_90a only). The same contract and
// arithmetic as flash.cu's flash_bf16_128 (q rotated and scaled for exp2 as it is read,
// rounded to bf16; bf16 K/V; f32 accumulators; online softmax), with the products issued
// per warpgroup instead of per warp:
//   S = Q K^T: wgmma m64n64k16, A = Q from registers (the mma.sync A fragment is the
//              wgmma one, warp w holding rows 16w..16w+15), B = the K tile in shared memory;
//   O += P V:  wgmma m64n128k16 (all 128 dims), A = P from registers (the S accumulator
//              converted as flash.cu converts it), B = the V tile, transposed.
//
// Block = HPB warpgroups (4 warps each); warpgroup w takes 64 queries of head
// blockIdx.x * HPB + w. flash_wg_bf16_128 (HPB 1) has the grid of flash_bf16_128;
// flash_wg2_bf16_128 (HPB 2) pairs two heads of one KV group (the group size must be even),
// so each K/V tile crosses from L2 once for both. K and V tiles of 64 keys go through shared
// memory by cp.async, double-buffered, in the no-swizzle "core matrix" layout wgmma reads,
// padded: element (key j, dim d) of a tile at
// (j / 8) * WG_GROUP + (d / 8) * WG_CM + (j % 8) * 8 + d % 8 (bf16 elements). A core matrix
// is 8 keys x 8 dims (128 contiguous bytes); core matrices lie 144 bytes apart along the
// dims (128 + 16: the eight 16-byte pieces of one key's 64 dims fall in eight different
// bank groups, so eight threads copying one key's 128 contiguous global bytes store without
// conflicts) and 2304 bytes apart along the keys. K is read K-major (dims are wgmma's K),
// V MN-major (dims are its N); the descriptors carry the two strides.

#ifndef FK
#define FK 64  // keys per tile, as flash.cu
#endif
#define WG_HD 128
#define WG_CM 72                          // elements from one core matrix to the next along the dims (144 bytes)
#define WG_GROUP (WG_CM * WG_HD / 8)      // elements from one 8-key group to the next (2304 bytes)
#define WG_TILE (FK / 8 * WG_GROUP)       // elements of one K or V tile

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

// d (64x128 f32, this thread's 64: d[h][t][i] is the PTX fragment's element 32 h + 4 t + i,
// so d[h] holds columns 64 h ..) += a (64x16 bf16, registers) * B (16x128 bf16, MN-major
// descriptor)
__device__ __forceinline__ void wgmma_64x128x16_t(float (&d)[2][8][4], const u32 (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
        "}\n"
        : "+f"(d[0][0][0]), "+f"(d[0][0][1]), "+f"(d[0][0][2]), "+f"(d[0][0][3]), "+f"(d[0][1][0]), "+f"(d[0][1][1]), "+f"(d[0][1][2]), "+f"(d[0][1][3]), "+f"(d[0][2][0]), "+f"(d[0][2][1]), "+f"(d[0][2][2]), "+f"(d[0][2][3]), "+f"(d[0][3][0]), "+f"(d[0][3][1]), "+f"(d[0][3][2]), "+f"(d[0][3][3]), "+f"(d[0][4][0]), "+f"(d[0][4][1]), "+f"(d[0][4][2]), "+f"(d[0][4][3]), "+f"(d[0][5][0]), "+f"(d[0][5][1]), "+f"(d[0][5][2]), "+f"(d[0][5][3]), "+f"(d[0][6][0]), "+f"(d[0][6][1]), "+f"(d[0][6][2]), "+f"(d[0][6][3]), "+f"(d[0][7][0]), "+f"(d[0][7][1]), "+f"(d[0][7][2]), "+f"(d[0][7][3]), "+f"(d[1][0][0]), "+f"(d[1][0][1]), "+f"(d[1][0][2]), "+f"(d[1][0][3]), "+f"(d[1][1][0]), "+f"(d[1][1][1]), "+f"(d[1][1][2]), "+f"(d[1][1][3]), "+f"(d[1][2][0]), "+f"(d[1][2][1]), "+f"(d[1][2][2]), "+f"(d[1][2][3]), "+f"(d[1][3][0]), "+f"(d[1][3][1]), "+f"(d[1][3][2]), "+f"(d[1][3][3]), "+f"(d[1][4][0]), "+f"(d[1][4][1]), "+f"(d[1][4][2]), "+f"(d[1][4][3]), "+f"(d[1][5][0]), "+f"(d[1][5][1]), "+f"(d[1][5][2]), "+f"(d[1][5][3]), "+f"(d[1][6][0]), "+f"(d[1][6][1]), "+f"(d[1][6][2]), "+f"(d[1][6][3]), "+f"(d[1][7][0]), "+f"(d[1][7][1]), "+f"(d[1][7][2]), "+f"(d[1][7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// Starts copying keys j0 .. j0 + FK of one KV head (c: its first key's dims) into s in the
// core-matrix layout above (zeros past `end`); NT threads, each copying the same 16-byte
// piece of every (NT / 16)-th key. Complete after cp_async_wait and __syncthreads. Sixteen
// consecutive threads copy one key's 256 contiguous bytes (whole sectors).
template <int NT>
__device__ __forceinline__ void wg_stage(u16* s, const u16* c, int kv_dim, int j0, int end) {
    constexpr int KEYS = NT / 16;  // keys per step
    const int dc = threadIdx.x & 15, jt = (threadIdx.x & (NT - 1)) >> 4;
    u16* sp = s + (jt >> 3) * WG_GROUP + dc * WG_CM + (jt & 7) * 8;
    const u16* gp = c + (size_t)(j0 + jt) * kv_dim + dc * 8;
#pragma unroll
    for (int k = 0; k < FK / KEYS; k++) {
        bool ok = j0 + jt + k * KEYS < end;
        cp_async16(sp + k * (KEYS / 8) * WG_GROUP, ok ? gp + (size_t)k * KEYS * kv_dim : c, ok);
    }
}

// named barriers 1 and 2: the two warpgroups' turns to issue products (ping-pong)
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void wg_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
// After a wait: the compiler must not move reads or writes of wgmma's registers above it
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int k = 0; k < 4; k++) asm volatile("" : "+f"(r[i][k])::"memory");
}
template <int A, int N>
__device__ __forceinline__ void reg_fence(float (&r)[A][N][4]) {
#pragma unroll
    for (int a = 0; a < A; a++) reg_fence(r[a]);
}
__device__ __forceinline__ void reg_fence(u32 (&r)[FK / 16][4]) {
#pragma unroll
    for (int i = 0; i < FK / 16; i++)
#pragma unroll
        for (int k = 0; k < 4; k++) asm volatile("" : "+r"(r[i][k])::"memory");
}

// Starts loading tile j0 (K then V of one KV head) into stage st (NT threads, the whole
// block; part of the caller's cp.async group)
template <int NT>
__device__ __forceinline__ void wg_load(u16* st, const u16* kh, const u16* vh, int kv_dim, int j0, int end) {
    wg_stage<NT>(st, kh, kv_dim, j0, end);
    wg_stage<NT>(st + WG_TILE, vh, kv_dim, j0, end);
}

// Issues S = Q K^T over the 64 keys of the K tile ks (after the caller's wg_fence): k-step kk
// reads dims 16 kk .. (K-major: leading byte offset 144 along the dims, stride byte offset
// 2304 along the keys)
__device__ __forceinline__ void wg_scores(float (&s)[8][4], const u32 (&qf)[WG_HD / 16][4], const u16* ks) {
#pragma unroll
    for (int kk = 0; kk < WG_HD / 16; kk++) wgmma_64x64x16<0>(s, qf[kk], wg_desc(ks + kk * 2 * WG_CM, WG_CM * 2, WG_GROUP * 2));
}

// Issues O += P V over the V tile vs: k-step kk reads keys 16 kk .. and all 128 dims in one
// m64n128k16 (MN-major: leading byte offset 2304 along the keys, stride byte offset 144
// along the dims)
__device__ __forceinline__ void wg_pv(float (&o)[2][8][4], const u32 (&pf)[FK / 16][4], const u16* vs) {
#pragma unroll
    for (int kk = 0; kk < FK / 16; kk++) wgmma_64x128x16_t(o, pf[kk], wg_desc(vs + kk * 2 * WG_GROUP, WG_GROUP * 2, WG_CM * 2));
}

// The padded core-matrix tiles above, for the step functions below (the TMA kernels' tiles
// are Sw128Tiles)
struct PadTiles {
    static __device__ __forceinline__ void scores(float (&s)[8][4], const u32 (&qf)[WG_HD / 16][4], const u16* ks) { wg_scores(s, qf, ks); }
    static __device__ __forceinline__ void pv(float (&o)[2][8][4], const u32 (&pf)[FK / 16][4], const u16* vs) { wg_pv(o, pf, vs); }
};

__device__ __forceinline__ void wg_rescale(float (&o)[2][8][4], float c0, float c1) {
#pragma unroll
    for (int t = 0; t < 16; t++) {
        o[t >> 3][t & 7][0] *= c0;
        o[t >> 3][t & 7][1] *= c0;
        o[t >> 3][t & 7][2] *= c1;
        o[t >> 3][t & 7][3] *= c1;
    }
}

// One warpgroup's rows in the three-stage loop: O, the scores' accumulator (the
// probabilities once the softmax is done with it), P of the tile whose P V comes next, the
// factors (c0, c1) that O still has to be rescaled by before that P V, the running maxima
// and sums, and this lane's rows' positions.
struct WgRows {
    float o[2][8][4];
    float s[8][4];
    u32 pf[FK / 16][4];
    float c0, c1, m0, m1, l0, l1;
    int qp0, qp1, tig;
    __device__ __forceinline__ void init(int p0, int p1, int t) {
#pragma unroll
        for (int i = 0; i < 32; i++) o[0][i >> 2][i & 3] = o[1][i >> 2][i & 3] = 0.f;
        m0 = m1 = __int_as_float(0xff800000);
        l0 = l1 = 0.f;
        c0 = c1 = 1.f;
        qp0 = p0;
        qp1 = p1;
        tig = t;
    }
    // O *= (c0, c1) per row, skipped when no row of the warp has a new maximum (the factors
    // are all 1: the same bits), which past the first tiles of a long row is nearly always.
    // Then a fence: O's registers were written outside wgmma.
    __device__ __forceinline__ void rescale() {
        if (!__all_sync(0xffffffffu, c0 == 1.f && c1 == 1.f)) wg_rescale(o, c0, c1);
        wg_fence();
    }
};

// The first tile's scores (its K at ks, tiles laid out as L says) and softmax.
template <class L>
__device__ __forceinline__ void wg_first(WgRows& w, const u32 (&qf)[WG_HD / 16][4], const u16* ks) {
#pragma unroll
    for (int i = 0; i < 32; i++) w.s[i >> 2][i & 3] = 0.f;
    wg_fence();
    L::scores(w.s, qf, ks);
    wg_commit();
    wg_wait_all();
    reg_fence(w.s);
    softmax_exp<8>(w.s, 0, w.qp0, w.qp1, w.tig, w.m0, w.m1, w.l0, w.l1, w.c0, w.c1);
    pack_p<8>(w.s, w.pf);
}

// One step of the three-stage loop: issues the scores of the next tile (keys j0n.., K at kn),
// rescales O meanwhile, issues P V of this tile (V at vs), and runs the next tile's softmax,
// keeping the probabilities in f32 until P V is complete (converting them to P earlier
// would write P's registers under the running product); then `done()` (this tile's stage
// is free) and the conversion. ptxas still hoists the wait for P V to the start of the
// softmax's block (after the masking branch) whatever the PTX order, so the products that
// run under a softmax are mostly the other warpgroup's.
// With PP the issue waits for this warpgroup's turn (named barrier 1 + wg, nc threads) and
// then hands the turn over, except warpgroup 1's last step.
template <class L, bool PP, class Done>
__device__ __forceinline__ void wg_step(WgRows& w, const u32 (&qf)[WG_HD / 16][4], const u16* kn, const u16* vs, int j0n, int wg, bool last, int nc,
                                        Done done) {
#pragma unroll
    for (int i = 0; i < 32; i++) w.s[i >> 2][i & 3] = 0.f;
    if constexpr (PP) named_sync(1 + wg, nc);
    wg_fence();
    L::scores(w.s, qf, kn);
    wg_commit();
    w.rescale();
    L::pv(w.o, w.pf, vs);
    wg_commit();
    if constexpr (PP) {
        if (wg == 0 || !last) named_arrive(2 - wg, nc);
    }
    wg_wait_one();  // the scores (P V may still run)
    reg_fence(w.s);
    softmax_exp<8>(w.s, j0n, w.qp0, w.qp1, w.tig, w.m0, w.m1, w.l0, w.l1, w.c0, w.c1);
    // the softmax done before the wait, not moved after it by the compiler
    reg_fence(w.s);
    asm volatile("" : "+f"(w.c0), "+f"(w.c1), "+f"(w.l0), "+f"(w.l1), "+f"(w.m0), "+f"(w.m1)::"memory");
    wg_wait_all();  // P V of this tile
    reg_fence(w.o);
    reg_fence(w.pf);
    done();
    pack_p<8>(w.s, w.pf);
}

// The last tile's P V alone (V at vs).
template <class L>
__device__ __forceinline__ void wg_last(WgRows& w, const u16* vs) {
    w.rescale();
    L::pv(w.o, w.pf, vs);
    wg_commit();
    wg_wait_all();
    reg_fence(w.o);
}

// out rows r0 and r1 (those under n_tokens) of head h: o / l, l summed over the quad
__device__ __forceinline__ void wg_store(const float (&o)[2][8][4], float l0, float l1, float* out, int r0, int r1, int n_tokens, int width,
                                         int h, int tig) {
    quad_sum(l0, l1);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int t = 0; t < 16; t++) {
        int d = t * 8 + tig * 2;
        const float* v = o[t >> 3][t & 7];
        if (r0 < n_tokens) *(float2*)(out + (size_t)r0 * width + (size_t)h * WG_HD + d) = make_float2(v[0] * i0, v[1] * i0);
        if (r1 < n_tokens) *(float2*)(out + (size_t)r1 * width + (size_t)h * WG_HD + d) = make_float2(v[2] * i1, v[3] * i1);
    }
}

template <int HPB, int STAGES, bool PP>
__device__ __forceinline__ void flash_wg(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads,
                                         int n_tokens, const int* pos, float scale, int rd, const float2* cs) {
    constexpr int KS = WG_HD / 16, ST = 2 * WG_TILE;  // k-steps of S; u16 per stage (K, V)
    static_assert(STAGES == 2 || STAGES == 3, "2 or 3 stages");
    static_assert(!PP || (HPB == 2 && STAGES == 3), "ping-pong takes two warpgroups and three stages");
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
    constexpr int NT = 128 * HPB;
    const u16 *kh = kc + (size_t)g * WG_HD, *vh = vc + (size_t)g * WG_HD;
    float s[8][4];  // the scores' accumulator: its d[4 nt + i] is s[nt][i]
    u32 pf[FK / 16][4];
    float c0, c1;
    if constexpr (STAGES == 2) {
        // each tile in turn: scores, softmax, P V; the next tile loads meanwhile
        wg_load<NT>(smem, kh, vh, kv_dim, 0, end);
        cp_async_commit();
        for (int it = 0; it < n_tiles; it++) {
            if (it + 1 < n_tiles) {
                wg_load<NT>(smem + ((it + 1) & 1) * ST, kh, vh, kv_dim, (it + 1) * FK, end);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_async_shared();
            __syncthreads();
            const u16* ks = smem + (it & 1) * ST;
#pragma unroll
            for (int i = 0; i < 32; i++) s[i >> 2][i & 3] = 0.f;
            wg_fence();
            wg_scores(s, qf, ks);
            wg_commit();
            wg_wait_all();
            reg_fence(s);
            // causal mask and the online softmax, as flash.cu
            softmax_tile<8>(s, it * FK, pos0 + r0, pos0 + r1, tig, m0, m1, l0, l1, c0, c1, pf);
            wg_rescale(o, c0, c1);
            wg_fence();
            wg_pv(o, pf, ks + WG_TILE);
            wg_commit();
            wg_wait_all();
            reg_fence(o);
            __syncthreads();  // before the next iteration refills this stage
        }
    } else {
        // three stages, and the tensor cores kept busy through the softmax: iteration it
        // issues the scores of tile it + 1 and then P V of tile it, and runs the softmax of
        // tile it + 1 while P V runs; tile it + 2 loads meanwhile into the stage tile it - 1
        // left
        wg_load<NT>(smem, kh, vh, kv_dim, 0, end);
        cp_async_commit();
        if (n_tiles > 1) wg_load<NT>(smem + ST, kh, vh, kv_dim, FK, end);
        cp_async_commit();
        cp_async_wait<1>();
        fence_async_shared();
        __syncthreads();
        WgRows w;
        w.init(pos0 + r0, pos0 + r1, tig);
        wg_first<PadTiles>(w, qf, smem);
        // ping-pong: warpgroup 0 issues its products first, then lets warpgroup 1 issue
        // (named barrier 2) and runs its softmax under them; warpgroup 1 hands the turn back
        // (barrier 1) for the next tile. Each sync meets exactly one arrival.
        const int wg = threadIdx.x >> 7;
        if constexpr (PP) {
            if (wg == 1 && n_tiles > 1) named_arrive(1, NT);
        }
        for (int it = 0; it + 1 < n_tiles; it++) {
            cp_async_wait<0>();  // tile it + 1 has landed, for this thread
            fence_async_shared();
            __syncthreads();  // ... and for all; and every warpgroup is done with tile it - 1
            if (it + 2 < n_tiles) wg_load<NT>(smem + ((it + 2) % 3) * ST, kh, vh, kv_dim, (it + 2) * FK, end);
            cp_async_commit();
            wg_step<PadTiles, PP>(w, qf, smem + ((it + 1) % 3) * ST, smem + (it % 3) * ST + WG_TILE, (it + 1) * FK, wg, it + 2 >= n_tiles, NT,
                        [] {});
        }
        // the last tile (landed and synchronised above): P V alone
        wg_last<PadTiles>(w, smem + ((n_tiles - 1) % 3) * ST + WG_TILE);
        wg_store(w.o, w.l0, w.l1, out, r0, r1, n_tokens, width, h, tig);
        return;
    }
    wg_store(o, l0, l1, out, r0, r1, n_tokens, width, h, tig);
}

// flash_wg{2}{p}_bf16_128: 1 or 2 heads per block; p: three stages, tile j+1's scores
// issued before tile j's P V; flash_wgpp2_bf16_128: that with two heads, ping-pong.
// Shared memory: (2 or 3) * 2 * WG_TILE * 2 bytes.
#define WG_KERNEL(NAME, HPB, STAGES, PP)                                                                                               \
    extern "C" __global__ void __launch_bounds__(128 * HPB) NAME(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, \
                                                                 int n_kv_heads, int n_tokens, int hd, const int* pos, float scale,    \
                                                                 int rd, const float2* cs) { PDL_ENTRY();                                           \
        flash_wg<HPB, STAGES, PP>(q, kc, vc, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs);                                  \
    }
WG_KERNEL(flash_wg_bf16_128, 1, 2, false)
WG_KERNEL(flash_wg2_bf16_128, 2, 2, false)
WG_KERNEL(flash_wgp_bf16_128, 1, 3, false)
WG_KERNEL(flash_wgp2_bf16_128, 2, 3, false)
WG_KERNEL(flash_wgpp2_bf16_128, 2, 3, true)

// ---- Two consumer warpgroups and a producer warpgroup (flash_wgs2*_bf16_128) ----
// Block = 384 threads: warpgroups 0 and 1 take heads 2 blockIdx.x and 2 blockIdx.x + 1 (one
// KV group, the same 64 queries) as flash_wgp2 does; warpgroup 2 only copies K/V tiles,
// and gives registers to the consumers (setmaxnreg: 40 for it, 232 for them). Three
// stages, each with two mbarriers in shared memory after the tiles: `full` (128 arrivals:
// each producer thread after its own copies of the stage's tile have landed and been
// fenced for the async proxy) and `empty` (256 arrivals: each consumer thread once its P V
// over the stage is complete). No block-wide barrier after the start, so the warpgroups drift
// apart; with PP they also take turns issuing products (named barriers 1 and 2), so one's
// softmax runs under the other's products. Same arithmetic, tile by tile, as flash_wgp2.
#define WS_THREADS 384

__device__ __forceinline__ void mb_init(u64* b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_arrive(u64* b) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(b)) : "memory");
}
// a loop on mbarrier.try_wait.parity with the given semantics and scope qualifiers
#define MB_WAIT_ASM(SEM)                                            \
    "{\n.reg .pred done;\nWAIT_%=:\n"                               \
    "mbarrier.try_wait.parity" SEM ".shared::cta.b64 done, [%0], %1;\n" \
    "@!done bra WAIT_%=;\n}\n"
// waits for the completion of the phase with this parity
__device__ __forceinline__ void mb_wait(u64* b, int parity) { asm volatile(MB_WAIT_ASM("") ::"r"(smem_addr(b)), "r"(parity) : "memory"); }

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }

// Consumer warpgroup wg (0 or 1) of a kernel with a producer warpgroup: the 64 queries of
// query tile `tile` of head 2 blockIdx.x + wg over n_tiles K/V tiles laid out as L says.
// `ready(t)`: wait until tile t has landed; kat(t), vat(t): its K and V; `release(t)`: this
// thread is done with tile t (its P V is complete). nc: consumer threads (ping-pong).
template <class L, bool PP, class Ready, class KAt, class VAt, class Release>
__device__ __forceinline__ void ws_consume(const float* q, float* out, int n_heads, int n_tokens, int pos0, float scale, int rd,
                                           const float2* cs, int tile, int wg, int n_tiles, int nc, Ready ready, KAt kat, VAt vat,
                                           Release release) {
    constexpr int KS = WG_HD / 16;
    const int width = n_heads * WG_HD, h = blockIdx.x * 2 + wg;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int r0 = tile * 64 + warp * 16 + gid, r1 = r0 + 8;
    const float* q0 = r0 < n_tokens ? q + (size_t)r0 * width + (size_t)h * WG_HD : nullptr;
    const float* q1 = r1 < n_tokens ? q + (size_t)r1 * width + (size_t)h * WG_HD : nullptr;
    u32 qf[KS][4];
    q_fragments<KS>(qf, q0, q1, cs + (size_t)r0 * (rd >> 1), cs + (size_t)r1 * (rd >> 1), WG_HD, rd, scale, tig);
    WgRows w;
    w.init(pos0 + r0, pos0 + r1, tig);
    ready(0);
    wg_first<L>(w, qf, kat(0));
    if constexpr (PP) {
        if (wg == 1 && n_tiles > 1) named_arrive(1, nc);
    }
    for (int it = 0; it + 1 < n_tiles; it++) {
        ready(it + 1);
        wg_step<L, PP>(w, qf, kat(it + 1), vat(it), (it + 1) * FK, wg, it + 2 >= n_tiles, nc, [&] { release(it); });
    }
    wg_last<L>(w, vat(n_tiles - 1));
    wg_store(w.o, w.l0, w.l1, out, r0, r1, n_tokens, width, h, tig);
}

template <bool PP>
__device__ __forceinline__ void flash_ws(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads,
                                         int n_tokens, const int* pos, float scale, int rd, const float2* cs) {
    constexpr int ST = 2 * WG_TILE, NC = 256;  // u16 per stage (K, V); consumer threads
    extern __shared__ __align__(128) u16 smem[];
    u64* full = (u64*)(smem + 3 * ST);
    u64* empty = full + 3;
    const int wg = threadIdx.x >> 7;  // 0, 1: consumers; 2: the producer warpgroup
    const int g = (blockIdx.x * 2) / (n_heads / n_kv_heads);
    const int tile = gridDim.y - 1 - blockIdx.y;  // the longest tiles first
    const int pos0 = *pos, kv_dim = n_kv_heads * WG_HD;
    const int end = pos0 + min(n_tokens, tile * 64 + 64);  // keys any query of the block sees
    const int n_tiles = (end + FK - 1) / FK;
    if (threadIdx.x < 3) {
        mb_init(full + threadIdx.x, 128);
        mb_init(empty + threadIdx.x, NC);
    }
    __syncthreads();  // the barriers exist (the last block-wide barrier)

    if (wg == 2) {
        // producer: tile t into stage t % 3 once the consumers are done with tile t - 3; tile
        // t - 1 published when this thread's copies of it have landed
        setmaxnreg_dec<40>();
        const u16 *kh = kc + (size_t)g * WG_HD, *vh = vc + (size_t)g * WG_HD;
        for (int t = 0; t < n_tiles; t++) {
            if (t >= 3) mb_wait(empty + t % 3, (t / 3 - 1) & 1);
            wg_load<128>(smem + (t % 3) * ST, kh, vh, kv_dim, t * FK, end);
            cp_async_commit();
            if (t >= 1) {
                cp_async_wait<1>();
                fence_async_shared();
                mb_arrive(full + (t - 1) % 3);
            }
        }
        cp_async_wait<0>();
        fence_async_shared();
        mb_arrive(full + (n_tiles - 1) % 3);
        return;
    }

    setmaxnreg_inc<232>();
    ws_consume<PadTiles, PP>(
        q, out, n_heads, n_tokens, pos0, scale, rd, cs, tile, wg, n_tiles, NC,
        [&](int t) {
            mb_wait(full + t % 3, (t / 3) & 1);  // tile t has landed
            fence_async_shared();
        },
        [&](int t) { return smem + (t % 3) * ST; }, [&](int t) { return smem + (t % 3) * ST + WG_TILE; },
        [&](int t) { mb_arrive(empty + t % 3); });
}

// Shared memory: 3 * 2 * WG_TILE * 2 bytes of tiles, then 6 mbarriers (48 bytes).
extern "C" __global__ void __launch_bounds__(WS_THREADS) flash_wgs2_bf16_128(const float* q, const u16* kc, const u16* vc, float* out,
                                                                           int n_heads, int n_kv_heads, int n_tokens, int hd,
                                                                           const int* pos, float scale, int rd, const float2* cs) { PDL_ENTRY();
    flash_ws<false>(q, kc, vc, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs);
}
extern "C" __global__ void __launch_bounds__(WS_THREADS) flash_wgspp2_bf16_128(const float* q, const u16* kc, const u16* vc, float* out,
                                                                             int n_heads, int n_kv_heads, int n_tokens, int hd,
                                                                             const int* pos, float scale, int rd, const float2* cs) { PDL_ENTRY();
    flash_ws<true>(q, kc, vc, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs);
}

// ---- TMA loads (flash_wgt2_bf16_128; flash_wgtc2_bf16_128 multicasts to a cluster) ----
// The producer kernel's consumers over tiles that the Tensor Memory Accelerator copies: one
// thread of the producer warpgroup issues four boxes per stage (K dims 0-63 and 64-127, V
// the same), each 64 keys x 64 dims, landing 128-byte swizzled (the canonical SW128 layout
// wgmma reads: key j's 128 bytes at j * 128, 16-byte chunk c at chunk c ^ (j % 8)), and
// counted in the stage's `full` mbarrier as transaction bytes. Keys past the cache's
// filled length arrive as zeros. K is read K-major (8-key groups 1024 bytes apart, a
// k-step 32 bytes along the row), V MN-major (64-dim halves 8 KiB apart, 8-key groups 1024).
// flash_wgtc2 runs as clusters of two blocks, the two head pairs of one KV group and query
// tile: block 0 of the cluster copies both blocks' K and block 1 both blocks' V, so each
// tile crosses from L2 once per cluster instead of once per block (L2 bandwidth is what
// bounds the one-block kernels). A stage is refilled once the consumer warps of both
// blocks have released it (`empty` counts 8 warps per block).
struct __align__(64) TmaMap {
    unsigned long long v[16];
};
#define WT_STAGES 4
#define WT_BOX 8192              // bytes: 64 keys x 64 dims of bf16
#define WT_STAGE (4 * WT_BOX)    // K low dims, K high dims, V low dims, V high dims

// shared memory matrix descriptor, 128-byte swizzle
__device__ __forceinline__ unsigned long long sw128_desc(u32 a, u32 lbo, u32 sbo) {
    return ((unsigned long long)((a & 0x3FFFF) >> 4)) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

struct Sw128Tiles {
    // S = Q K^T: k-step kk reads dims 16 kk.. of the K half kk / 4, 32 (kk % 4) bytes into
    // each swizzled row
    static __device__ __forceinline__ void scores(float (&s)[8][4], const u32 (&qf)[WG_HD / 16][4], const u16* ks) {
        const u32 a = smem_addr(ks);
#pragma unroll
        for (int kk = 0; kk < WG_HD / 16; kk++) wgmma_64x64x16<0>(s, qf[kk], sw128_desc(a + (kk >> 2) * WT_BOX + (kk & 3) * 32, 16, 1024));
    }
    // O += P V: k-step kk reads keys 16 kk.. (two 8-key groups) and both 64-dim halves
    static __device__ __forceinline__ void pv(float (&o)[2][8][4], const u32 (&pf)[FK / 16][4], const u16* vs) {
        const u32 a = smem_addr(vs);
#pragma unroll
        for (int kk = 0; kk < FK / 16; kk++) wgmma_64x128x16_t(o, pf[kk], sw128_desc(a + kk * 2048, WT_BOX, 1024));
    }
};

__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void mb_expect_tx(u64* b, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes) : "memory");
}
// the same barrier in block `rank` of the cluster
__device__ __forceinline__ void mb_arrive_cluster(u64* b, u32 rank) {
    asm volatile(
        "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}" ::"r"(
            smem_addr(b)),
        "r"(rank)
        : "memory");
}
// mb_wait for arrivals from the whole cluster
__device__ __forceinline__ void mb_wait_cluster(u64* b, int parity) {
    asm volatile(MB_WAIT_ASM(".acquire.cluster") ::"r"(smem_addr(b)), "r"(parity) : "memory");
}
// box (c0, c1, c2) of map m into dst, counted on bar; with MC, into the same offsets (and
// barrier) of every block of the cluster in `mask`
template <bool MC>
__device__ __forceinline__ void tma_box(const u16* dst, const TmaMap* m, int c0, int c1, int c2, u64* bar, u16 mask) {
    if constexpr (MC)
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4}], [%5], %6;" ::"r"(
                smem_addr(dst)),
            "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)), "h"(mask)
            : "memory");
    else
        asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
                         smem_addr(dst)),
                     "l"(m), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
                     : "memory");
}

template <int CL>
__device__ __forceinline__ void flash_wt(const float* q, float* out, int n_heads, int n_kv_heads, int n_tokens, const int* pos, float scale,
                                         int rd, const float2* cs, const TmaMap* tk, const TmaMap* tv) {
    extern __shared__ __align__(1024) u16 smem[];
    // the tiles 1024-byte aligned (the swizzle pattern repeats every 1024 bytes)
    u16* tiles = smem + ((1024 - (smem_addr(smem) & 1023)) & 1023) / 2;
    u64* full = (u64*)(tiles + WT_STAGES * WT_STAGE / 2);
    u64* empty = full + WT_STAGES;
    const int wg = threadIdx.x >> 7;  // 0, 1: consumers; 2: the producer warpgroup
    const int g = (blockIdx.x * 2) / (n_heads / n_kv_heads);
    const int tile = gridDim.y - 1 - blockIdx.y;  // the longest tiles first
    const int pos0 = *pos;
    const int end = pos0 + min(n_tokens, tile * 64 + 64);  // keys any query of the block sees
    const int n_tiles = (end + FK - 1) / FK;
    const u32 rank = CL > 1 ? cluster_rank() : 0;
    if (threadIdx.x < WT_STAGES) {
        mb_init(full + threadIdx.x, 1);
        mb_init(empty + threadIdx.x, 8 * CL);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if constexpr (CL > 1)
        cluster_sync();  // every block's barriers exist before any copy or remote arrival
    else
        __syncthreads();

    if (wg == 2) {
        setmaxnreg_dec<40>();
        if (threadIdx.x == 256) {
            for (int t = 0; t < n_tiles; t++) {
                const int st = t % WT_STAGES;
                if (t >= WT_STAGES) mb_wait_cluster(empty + st, (t / WT_STAGES - 1) & 1);
                mb_expect_tx(full + st, WT_STAGE);  // this block's stage fills completely
                u16* d = tiles + st * (WT_STAGE / 2);
                if constexpr (CL == 1) {
                    tma_box<false>(d, tk, 0, g, t * FK, full + st, 0);
                    tma_box<false>(d + WT_BOX / 2, tk, 64, g, t * FK, full + st, 0);
                    tma_box<false>(d + WT_BOX, tv, 0, g, t * FK, full + st, 0);
                    tma_box<false>(d + 3 * WT_BOX / 2, tv, 64, g, t * FK, full + st, 0);
                } else {
                    // block 0 copies K, block 1 V, each to both
                    const TmaMap* m = rank == 0 ? tk : tv;
                    u16* dd = d + rank * WT_BOX;
                    tma_box<true>(dd, m, 0, g, t * FK, full + st, 3);
                    tma_box<true>(dd + WT_BOX / 2, m, 64, g, t * FK, full + st, 3);
                }
            }
        }
    } else {
        setmaxnreg_inc<232>();
        const int lane = threadIdx.x & 31;
        ws_consume<Sw128Tiles, false>(
            q, out, n_heads, n_tokens, pos0, scale, rd, cs, tile, wg, n_tiles, 256,
            [&](int t) { mb_wait(full + t % WT_STAGES, (t / WT_STAGES) & 1); },
            [&](int t) { return tiles + (t % WT_STAGES) * (WT_STAGE / 2); },
            [&](int t) { return tiles + (t % WT_STAGES) * (WT_STAGE / 2) + WT_BOX; },
            [&](int t) {
                // a warp releases the stage once all its lanes' products are complete
                __syncwarp();
                if (lane == 0) {
                    mb_arrive(empty + t % WT_STAGES);
                    if constexpr (CL > 1) mb_arrive_cluster(empty + t % WT_STAGES, rank ^ 1);
                }
            });
    }
    // no block leaves while the other may still copy into it or arrive on its barriers
    if constexpr (CL > 1) cluster_sync();
}

// Shared memory: WT_STAGES * WT_STAGE bytes of tiles, 1024 for their alignment, and
// 2 * WT_STAGES mbarriers. tk, tv: 3-d maps (dims, KV heads, positions) of the K and V
// caches with 64 x 1 x 64 boxes, 128-byte swizzle (kernels/src/cuda/tma.rs).
extern "C" __global__ void __launch_bounds__(WS_THREADS)
    flash_wgt2_bf16_128(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads, int n_tokens, int hd,
                        const int* pos, float scale, int rd, const float2* cs, const __grid_constant__ TmaMap tk,
                        const __grid_constant__ TmaMap tv) { PDL_ENTRY();
    flash_wt<1>(q, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs, &tk, &tv);
}
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(WS_THREADS)
    flash_wgtc2_bf16_128(const float* q, const u16* kc, const u16* vc, float* out, int n_heads, int n_kv_heads, int n_tokens, int hd,
                         const int* pos, float scale, int rd, const float2* cs, const __grid_constant__ TmaMap tk,
                         const __grid_constant__ TmaMap tv) { PDL_ENTRY();
    flash_wt<2>(q, out, n_heads, n_kv_heads, n_tokens, pos, scale, rd, cs, &tk, &tv);
}
