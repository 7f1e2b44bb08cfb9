// Causal GQA prefill attention on tensor cores (prepended: common.cuh, mma.cuh), over a bf16 or
// q8_0 KV cache (KvBf16, KvQ8 below): flash-attention style, one pass over the keys with an online softmax, S = QK^T and
// O += PV as bf16 mma.sync m16n8k16 products with f32 accumulators.
//
// Block = 4 warps = 64 queries (16 per warp) of one query head h; grid = (n_heads, query
// tiles), heads fastest so that the heads sharing a KV head run together and share its keys
// and values through L2. Keys and values go through shared memory in tiles of 64, rows
// padded to HD + 8 values (conflict-free fragment loads). q is f32 [n_tokens, n_heads * hd]
// at positions *pos.. (rotated by partial NeoX RoPE as it is read when rd > 0, table cs),
// scaled by scale * log2(e) as it is rounded to bf16 (so the softmax
// uses exp2); caches are bf16 [>= *pos + n_tokens, n_kv_heads * hd]; out is f32.

#define FQ 64  // queries per block
#define FK 64  // keys per tile

// Starts copying rows j0 .. j0 + FK of KV head g into s[FK][LD] (zeros past `end` and
// past hd). Whole block; complete after cp_async_wait and __syncthreads. hd % 8 == 0.
template <int HD>
__device__ void flash_stage(u16* s, const u16* c, int g, int kv_dim, int hd, int j0, int end) {
    constexpr int LD = HD + 8;
#pragma unroll
    for (int i = threadIdx.x; i < FK * HD / 8; i += blockDim.x) {
        int j = i / (HD / 8), d = (i % (HD / 8)) * 8;
        bool ok = j0 + j < end && d < hd;
        cp_async16(s + j * LD + d, ok ? c + (size_t)(j0 + j) * kv_dim + (size_t)g * hd + d : c, ok);
    }
}

// The K/V sources of the kernels below. Each stages a 64-key tile of KV head g (keys j0 ..
// j0 + FK, zeros past `end`) into a stage buffer asynchronously (complete after cp_async_wait
// and __syncthreads), then hands the kernel that tile as bf16, K then V, [FK][HD + 8] each.

// bf16 caches [rows, kv_dim]: the stage buffer is the tile.
struct KvBf16 {
    const u16* k;
    const u16* v;
    template <int HD>
    __device__ static constexpr int stage_u16() {
        return 2 * FK * (HD + 8);
    }
    template <int HD>
    __device__ void stage(u16* buf, int g, int kv_dim, int hd, int j0, int end) const {
        flash_stage<HD>(buf, k, g, kv_dim, hd, j0, end);
        flash_stage<HD>(buf + FK * (HD + 8), v, g, kv_dim, hd, j0, end);
    }
    template <int HD>
    __device__ const u16* tile(const u16* buf, u16*) const {
        return buf;
    }
};

// q8_0 caches: int8 values [rows, kv_dim] and f32 block scales [rows, kv_dim / 32] (each
// the f16-rounded d of ggml's q8_0). The stage buffer holds the raw tiles (K values
// [FK][HD], V values, K scales [FK][HD / 32], V scales); tile() writes them as bf16 into
// `conv` (whole block, synchronised), so the products are those of a bf16 cache holding
// the dequantized values. hd % 32 == 0.
struct KvQ8 {
    const i8* k;
    const i8* v;
    const float* kd;
    const float* vd;
    template <int HD>
    __device__ static constexpr int stage_u16() {
        return FK * HD + FK * (HD / 32) * 4;  // 2 x FK x HD bytes, 2 x FK x HD / 32 floats
    }
    template <int HD>
    __device__ void stage_one(i8* vals, float* sc, const i8* c, const float* d, int g, int kv_dim, int hd, int j0, int end) const {
#pragma unroll
        for (int i = threadIdx.x; i < FK * HD / 16; i += blockDim.x) {
            int j = i / (HD / 16), x = (i % (HD / 16)) * 16;
            bool ok = j0 + j < end && x < hd;
            cp_async16(vals + j * HD + x, ok ? c + (size_t)(j0 + j) * kv_dim + (size_t)g * hd + x : c, ok);
        }
        const int nb = kv_dim / 32;
        for (int i = threadIdx.x; i < FK * (HD / 32); i += blockDim.x) {
            int j = i / (HD / 32), b = i % (HD / 32);
            bool ok = j0 + j < end && b * 32 < hd;
            cp_async4(sc + i, ok ? d + (size_t)(j0 + j) * nb + (size_t)g * (hd / 32) + b : d, ok);
        }
    }
    template <int HD>
    __device__ void stage(u16* buf, int g, int kv_dim, int hd, int j0, int end) const {
        i8* vals = (i8*)buf;
        float* sc = (float*)(vals + 2 * FK * HD);
        stage_one<HD>(vals, sc, k, kd, g, kv_dim, hd, j0, end);
        stage_one<HD>(vals + FK * HD, sc + FK * (HD / 32), v, vd, g, kv_dim, hd, j0, end);
    }
    template <int HD>
    __device__ const u16* tile(const u16* buf, u16* conv) const {
        constexpr int LD = HD + 8;
        const i8* vals = (const i8*)buf;
        const float* sc = (const float*)(vals + 2 * FK * HD);
        // 8 values per step: K rows then V rows (the kernels run 128 threads). A signed byte
        // x becomes a float without a conversion instruction: with its sign bit flipped it
        // is x + 128, placed under the exponent of 2^23 (one byte permute) that is the float
        // 2^23 + 128 + x, and subtracting 2^23 + 128 leaves x exactly; then x * d as before.
        constexpr int NT = 128;
#pragma unroll 4
        for (int i = threadIdx.x; i < 2 * FK * HD / 8; i += NT) {
            int kv = i / (FK * HD / 8), r = i % (FK * HD / 8);
            int j = r / (HD / 8), x = (r % (HD / 8)) * 8;
            const i8* src = vals + kv * FK * HD + j * HD + x;
            float d = sc[kv * FK * (HD / 32) + j * (HD / 32) + x / 32];
            uint2 raw = *(const uint2*)src;
            u32 w[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                u32 word = (e < 2 ? raw.x : raw.y) ^ 0x80808080u;
                int b0 = (e & 1) * 2;
                float a = (__int_as_float(__byte_perm(word, 0x4B000000u, 0x7650 + b0)) - 8388736.f) * d;
                float b = (__int_as_float(__byte_perm(word, 0x4B000000u, 0x7650 + b0 + 1)) - 8388736.f) * d;
                w[e] = pack_bf16(a, b);
            }
            *(uint4*)(conv + kv * FK * LD + j * LD + x) = make_uint4(w[0], w[1], w[2], w[3]);
        }
        __syncthreads();
        return conv;
    }
};

template <int HD, class KV>
__device__ void flash(const float* q, const KV kv, float* out, int n_tokens, int n_heads, int n_kv_heads, int hd, const int* pos,
                      float scale, int rd, const float2* cs) {
    constexpr int LD = HD + 8, KS = HD / 16, DT = HD / 8, NT = FK / 8, ST = KV::template stage_u16<HD>();
    // two stage buffers of K and V tiles (the next tile loads while this one is used), then
    // the bf16 tile a converting source writes
    extern __shared__ __align__(16) u16 smem[];
    u16* conv = smem + 2 * ST;
    const int h = blockIdx.x, g = h / (n_heads / n_kv_heads);
    const int tile = gridDim.y - 1 - blockIdx.y;  // the longest tiles first
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int pos0 = *pos, kv_dim = n_kv_heads * hd, width = n_heads * hd;
    const int t0 = tile * FQ + warp * 16;             // this warp's first query
    const int r0 = t0 + gid, r1 = r0 + 8;             // this lane's two rows
    const int end = pos0 + min(n_tokens, tile * FQ + FQ);  // keys any query of the block sees
    const int last = pos0 + min(n_tokens - 1, t0 + 15);    // the warp's last query position

    // Q fragments (A operands): RoPE with each row's position, scaled for exp2, bf16
    const float* q0 = r0 < n_tokens ? q + (size_t)r0 * width + (size_t)h * hd : nullptr;
    const float* q1 = r1 < n_tokens ? q + (size_t)r1 * width + (size_t)h * hd : nullptr;
    u32 qf[KS][4];
    q_fragments<KS>(qf, q0, q1, cs + (size_t)r0 * (rd >> 1), cs + (size_t)r1 * (rd >> 1), hd, rd, scale, tig);
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = __int_as_float(0xff800000), m1 = m0, l0 = 0.f, l1 = 0.f;

    const int n_tiles = (end + FK - 1) / FK;
    kv.template stage<HD>(smem, g, kv_dim, hd, 0, end);
    cp_async_commit();
    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * FK;
        if (it + 1 < n_tiles) {
            kv.template stage<HD>(smem + ((it + 1) & 1) * ST, g, kv_dim, hd, j0 + FK, end);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* ks = kv.template tile<HD>(smem + (it & 1) * ST, conv);
        const u16* vs = ks + FK * LD;
        // every key of this tile is after every query of the warp: nothing to add
        if (j0 <= last) {
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int kk = 0; kk < KS; kk += 2) {
                    // matrices: keys nt*8.., dims kk*16 + {0, 8, 16, 24}
                    u32 b[4];
                    ldm4(b, ks + (nt * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
                    mma(s[nt], qf[kk], b[0], b[1]);
                    if (kk + 1 < KS) mma(s[nt], qf[kk + 1], b[2], b[3]);
                }
            }
            // causal mask and the online softmax (m, l, and c to rescale o); P as A fragments
            float c0, c1;
            u32 pf[NT / 2][4];
            softmax_tile<NT>(s, j0, pos0 + r0, pos0 + r1, tig, m0, m1, l0, l1, c0, c1, pf);
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                o[dt][0] *= c0;
                o[dt][1] *= c0;
                o[dt][2] *= c1;
                o[dt][3] *= c1;
            }
#pragma unroll
            for (int kk = 0; kk < FK / 16; kk++) {
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    // matrices: keys kk*16 + {0, 8}, dims dt*8 + {0, 8}
                    u32 b[4];
                    ldm4t(b, vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dt * 8 + (lane >> 4) * 8);
                    mma(o[dt], pf[kk], b[0], b[1]);
                    mma(o[dt + 1], pf[kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // before the next iteration refills this stage
    }
    // the row sums are spread over the group's 4 lanes
    quad_sum(l0, l1);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
        int d = dt * 8 + tig * 2;
        if (r0 < n_tokens) {
            float* p = out + (size_t)r0 * width + (size_t)h * hd;
            if (d < hd) p[d] = o[dt][0] * i0;
            if (d + 1 < hd) p[d + 1] = o[dt][1] * i0;
        }
        if (r1 < n_tokens) {
            float* p = out + (size_t)r1 * width + (size_t)h * hd;
            if (d < hd) p[d] = o[dt][2] * i1;
            if (d + 1 < hd) p[d + 1] = o[dt][3] * i1;
        }
    }
}

// Decode (one query per head, at position *pos) on tensor cores, split over the keys like
// attention.cu's attend_split: block (g, s) takes the query heads of KV head g as the rows
// of one 16-row tile (group <= 16; other rows are zero and never written) and scans its
// share of keys 0..*pos in FK-key tiles, double-buffered through shared memory as above.
// Warp w takes keys w*16 .. w*16+15 of every tile with its own online softmax; at the end
// the four warps' partials are merged through shared memory and written as attend_split
// writes them, part[(h * splits + s) * (hd + 2)] = (m, l, acc[hd]) with m in natural-log
// units, for attend_combine.
template <int HD, int STAGES, class KV>
__device__ void flash_decode(const float* q, const KV kv, float* part, int n_heads, int n_kv_heads, int hd, const int* pos, float scale,
                             int rd, const float2* cs) {
    constexpr int LD = HD + 8, KS = HD / 16, DT = HD / 8, WARPS = 4, ST = KV::template stage_u16<HD>();
    extern __shared__ __align__(16) u16 smem[];
    u16* conv = smem + STAGES * ST;
    const int g = blockIdx.x, s = blockIdx.y, splits = gridDim.y, group = n_heads / n_kv_heads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int kv_dim = n_kv_heads * hd;
    const int len = *pos + 1, per = (len + splits - 1) / splits;
    const int j_begin = min(len, s * per), j_end = min(len, j_begin + per);

    // Q fragments: the group's heads as rows, all at the one position (table row 0)
    const float* q0 = gid < group ? q + (size_t)(g * group + gid) * hd : nullptr;
    const float* q1 = gid + 8 < group ? q + (size_t)(g * group + gid + 8) * hd : nullptr;
    u32 qf[KS][4];
    q_fragments<KS>(qf, q0, q1, cs, cs, hd, rd, scale, tig);
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    const float ninf = __int_as_float(0xff800000);
    float m0 = ninf, m1 = ninf, l0 = 0.f, l1 = 0.f;

    // STAGES buffers: tiles it + 1 .. it + STAGES - 1 load while tile it is used (a commit
    // group per tile, empty past the end, so that waits count uniformly)
    const int n_tiles = (j_end - j_begin + FK - 1) / FK;
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++) {
        if (st < n_tiles) kv.template stage<HD>(smem + st * ST, g, kv_dim, hd, j_begin + st * FK, j_end);
        cp_async_commit();
    }
    for (int it = 0; it < n_tiles; it++) {
        const int j0 = j_begin + it * FK;
        {
            // into the buffer of tile it - 1, which every warp is done with
            const int nx = it + STAGES - 1;
            if (nx < n_tiles) kv.template stage<HD>(smem + (nx % STAGES) * ST, g, kv_dim, hd, j_begin + nx * FK, j_end);
            cp_async_commit();
        }
        cp_async_wait<STAGES - 1>();
        __syncthreads();  // tile it has landed
        const u16* ks = kv.template tile<HD>(smem + (it % STAGES) * ST, conv) + warp * 16 * LD;
        const u16* vs = ks + FK * LD;
        const int jw = j0 + warp * 16;  // this warp's first key
        if (jw < j_end) {
            float sc[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < KS; kk += 2) {
                    u32 b[4];
                    ldm4(b, ks + (nt * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
                    mma(sc[nt], qf[kk], b[0], b[1]);
                    if (kk + 1 < KS) mma(sc[nt], qf[kk + 1], b[2], b[3]);
                }
            }
            float mx0 = ninf, mx1 = ninf;
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                int j = jw + nt * 8 + tig * 2;
                if (j >= j_end) sc[nt][0] = sc[nt][2] = ninf;
                if (j + 1 >= j_end) sc[nt][1] = sc[nt][3] = ninf;
                mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
                mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
            }
            quad_max(mx0, mx1);
            // jw < j_end: every row has a valid key here, so the new maxima are finite
            float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
            m0 = n0;
            m1 = n1;
            u32 pf[4];
            float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                float p0 = exp2f(sc[nt][0] - n0), p1 = exp2f(sc[nt][1] - n0), p2 = exp2f(sc[nt][2] - n1), p3 = exp2f(sc[nt][3] - n1);
                ps0 += p0 + p1;
                ps1 += p2 + p3;
                pf[nt * 2] = pack_bf16(p0, p1);
                pf[nt * 2 + 1] = pack_bf16(p2, p3);
            }
            l0 = l0 * c0 + ps0;
            l1 = l1 * c1 + ps1;
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                u32 b[4];
                ldm4t(b, vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dt * 8 + (lane >> 4) * 8);
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    o[dt + x][0] *= c0;
                    o[dt + x][1] *= c0;
                    o[dt + x][2] *= c1;
                    o[dt + x][3] *= c1;
                }
                mma(o[dt], pf, b[0], b[1]);
                mma(o[dt + 1], pf, b[2], b[3]);
            }
        }
        __syncthreads();  // before the next iteration refills this tile's buffer
    }
    cp_async_wait<0>();  // (only empty groups remain)
    quad_sum(l0, l1);
    // merge the warps: wm[w][r], wl[w][r], wo[w][r][d] over the (now idle) tile buffers
    float* wm = (float*)smem;
    float* wl = wm + WARPS * 16;
    float* wo = wl + WARPS * 16;
    if (tig == 0) {
        wm[warp * 16 + gid] = m0;
        wm[warp * 16 + gid + 8] = m1;
        wl[warp * 16 + gid] = l0;
        wl[warp * 16 + gid + 8] = l1;
    }
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
        int d = dt * 8 + tig * 2;
        float* r0 = wo + ((size_t)warp * 16 + gid) * HD + d;
        float* r1 = r0 + 8 * HD;
        r0[0] = o[dt][0];
        r0[1] = o[dt][1];
        r1[0] = o[dt][2];
        r1[1] = o[dt][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        float m = ninf;
#pragma unroll
        for (int w = 0; w < WARPS; w++) m = fmaxf(m, wm[w * 16 + r]);
        float l = 0.f, a = 0.f;
        if (m != ninf) {
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                float f = exp2f(wm[w * 16 + r] - m);  // 0 for a warp that saw no key
                l += f * wl[w * 16 + r];
                a += f * wo[((size_t)w * 16 + r) * HD + d];
            }
        }
        float* p = part + ((size_t)(g * group + r) * splits + s) * (hd + 2);
        if (d == 0) {
            p[0] = m == ninf ? ninf : m * 0.6931471805599453f;
            p[1] = l;
        }
        p[2 + d] = a;
    }
}

#define FLASH(HD)                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) flash_bf16_##HD(const float* q, const u16* kc, const u16* vc, float* out,    \
                                                                     int n_heads, int n_kv_heads, int n_tokens, int hd,            \
                                                                     const int* pos, float scale, int rd, const float2* cs) { PDL_ENTRY();      \
        flash<HD>(q, KvBf16{kc, vc}, out, n_tokens, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                                  \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_decode_bf16_##HD(const float* q, const u16* kc, const u16* vc,         \
                                                                            float* part, int n_heads, int n_kv_heads, int hd,      \
                                                                            const int* pos, float scale, int rd, const float2* cs) { PDL_ENTRY(); \
        flash_decode<HD, 2>(q, KvBf16{kc, vc}, part, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                                 \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_decode3_bf16_##HD(const float* q, const u16* kc, const u16* vc,        \
                                                                             float* part, int n_heads, int n_kv_heads, int hd,     \
                                                                             const int* pos, float scale, int rd, const float2* cs) { PDL_ENTRY(); \
        flash_decode<HD, 3>(q, KvBf16{kc, vc}, part, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                                 \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_q8_##HD(const float* q, const i8* kc, const i8* vc, const float* kd,  \
                                                                   const float* vd, float* out, int n_heads, int n_kv_heads,       \
                                                                   int n_tokens, int hd, const int* pos, float scale, int rd,      \
                                                                   const float2* cs) { PDL_ENTRY();                                             \
        flash<HD>(q, KvQ8{kc, vc, kd, vd}, out, n_tokens, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                            \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_decode_q8_##HD(const float* q, const i8* kc, const i8* vc,             \
                                                                          const float* kd, const float* vd, float* part,           \
                                                                          int n_heads, int n_kv_heads, int hd, const int* pos,     \
                                                                          float scale, int rd, const float2* cs) { PDL_ENTRY();                 \
        flash_decode<HD, 2>(q, KvQ8{kc, vc, kd, vd}, part, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                           \
    }                                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) flash_decode3_q8_##HD(const float* q, const i8* kc, const i8* vc,            \
                                                                           const float* kd, const float* vd, float* part,          \
                                                                           int n_heads, int n_kv_heads, int hd, const int* pos,    \
                                                                           float scale, int rd, const float2* cs) { PDL_ENTRY();                \
        flash_decode<HD, 3>(q, KvQ8{kc, vc, kd, vd}, part, n_heads, n_kv_heads, hd, pos, scale, rd, cs);                           \
    }

FLASH(32)
FLASH(64)
FLASH(128)
