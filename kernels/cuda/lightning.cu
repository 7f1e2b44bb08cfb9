// Lightning attention (prepended: common.cuh): per head h with decay lambda_h,
//   S_t = lambda_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t          (S: hd x hd, f32)
// for any number of tokens, prefill or decode, reading and writing the state once.
//
// Column b of S depends only on column b of the v's. A warp owns 8 columns of one head;
// four lanes share a column, each keeping a quarter of its rows in registers (HD/4 floats),
// and the four partial q_t · S[:, b] are summed with two shuffles. q, k and the warp's v
// columns of a chunk of tokens are staged in shared memory first (all loads of a chunk in
// flight at once); q and k rows are stored in four padded quarters so that the quarters'
// 16-byte reads fall in different banks.
//
// qkv: [n_tokens, n_heads * 3 * hd] (SiLU'd as read when act != 0), per head [q | k | v];
// state: [n_heads, hd, hd] row-major (S[a][b]); decay: [n_heads]; out: [n_tokens, n_heads * hd].
// HD is the register tile (16, 32, 64 or 128), hd <= HD the head size: rows a >= hd see
// q = k = 0 and so stay zero. grid = (ceil(hd / 8), n_heads), block = 32 threads.

#define CHUNK 16

// q, k and v as the kernels read them: SiLU first when `act` (the model's order), or as given.
__device__ __forceinline__ float act_in(float v, int act) { return act ? silu(v) : v; }
__device__ __forceinline__ float4 act_in(float4 v, int act) {
    return act ? make_float4(silu(v.x), silu(v.y), silu(v.z), silu(v.w)) : v;
}

template <int HD>
__device__ void lightning(const float* qkv, float* state, const float* decay, float* out, int n_tokens, int n_heads, int hd, int act) {
    constexpr int R = HD / 4, PAD = R + 4;
    __shared__ __align__(16) float qs[CHUNK][4 * PAD];
    __shared__ __align__(16) float ks[CHUNK][4 * PAD];
    __shared__ float vs[CHUNK][8];
    int h = blockIdx.y, lane = threadIdx.x, col = lane >> 2, part = lane & 3;
    int b = blockIdx.x * 8 + col;
    bool live = b < hd;
    float* st = state + (size_t)h * hd * hd;
    // The state and the decay are read before the PDL wait: the kernel ahead computes q,
    // k and v, never the state, which this kernel wrote last (a layer's lightning steps
    // are separated by several kernels, each of which waited for the one before it), so
    // its load latency overlaps the products' drain.
    float s[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        int a = part * R + i;
        s[i] = (live && a < hd) ? st[a * hd + b] : 0.f;
    }
    float lam = decay[h];
    PDL_ENTRY();
    size_t stride = (size_t)n_heads * 3 * hd;
    for (int t0 = 0; t0 < n_tokens; t0 += CHUNK) {
        int m = min(CHUNK, n_tokens - t0);
        __syncwarp();
        if ((hd & 3) == 0) {
            // 16-byte loads, many in flight: this phase is bound by load latency
#pragma unroll 4
            for (int i = lane; i < m * (HD / 4); i += 32) {
                int t = i / (HD / 4), a = (i % (HD / 4)) * 4, pa = (a / R) * PAD + a % R;
                const float* row = qkv + (size_t)(t0 + t) * stride + (size_t)h * 3 * hd;
                float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
                *(float4*)&qs[t][pa] = a < hd ? act_in(*(const float4*)(row + a), act) : zero;
                *(float4*)&ks[t][pa] = a < hd ? act_in(*(const float4*)(row + hd + a), act) : zero;
            }
        } else {
#pragma unroll 8
            for (int i = lane; i < m * HD; i += 32) {
                int t = i / HD, a = i % HD, pa = (a / R) * PAD + a % R;
                const float* row = qkv + (size_t)(t0 + t) * stride + (size_t)h * 3 * hd;
                qs[t][pa] = a < hd ? act_in(row[a], act) : 0.f;
                ks[t][pa] = a < hd ? act_in(row[hd + a], act) : 0.f;
            }
        }
        for (int i = lane; i < m * 8; i += 32) {
            int t = i >> 3, c = blockIdx.x * 8 + (i & 7);
            vs[t][i & 7] = c < hd ? act_in(qkv[(size_t)(t0 + t) * stride + (size_t)h * 3 * hd + 2 * hd + c], act) : 0.f;
        }
        __syncwarp();
        for (int t = 0; t < m; t++) {
            float v = vs[t][col];
            const float* qp = &qs[t][part * PAD];
            const float* kp = &ks[t][part * PAD];
            float o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
#pragma unroll
            for (int i = 0; i < R; i += 4) {
                float4 q4 = *(const float4*)(qp + i);
                float4 k4 = *(const float4*)(kp + i);
                s[i] = fmaf(lam, s[i], k4.x * v);
                s[i + 1] = fmaf(lam, s[i + 1], k4.y * v);
                s[i + 2] = fmaf(lam, s[i + 2], k4.z * v);
                s[i + 3] = fmaf(lam, s[i + 3], k4.w * v);
                o0 = fmaf(q4.x, s[i], o0);
                o1 = fmaf(q4.y, s[i + 1], o1);
                o2 = fmaf(q4.z, s[i + 2], o2);
                o3 = fmaf(q4.w, s[i + 3], o3);
            }
            float o = (o0 + o1) + (o2 + o3);
            o += __shfl_xor_sync(0xffffffffu, o, 1);
            o += __shfl_xor_sync(0xffffffffu, o, 2);
            if (live && part == 0) out[(size_t)(t0 + t) * n_heads * hd + (size_t)h * hd + b] = o;
        }
    }
    if (live) {
#pragma unroll
        for (int i = 0; i < R; i++) {
            int a = part * R + i;
            if (a < hd) st[a * hd + b] = s[i];
        }
    }
}

#define LIGHTNING(HD)                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(32) lightning_##HD(const float* qkv, float* state, const float* decay, float* out, int n_tokens, \
                                                                    int n_heads, int hd, int act) {                                                \
        lightning<HD>(qkv, state, decay, out, n_tokens, n_heads, hd, act);                                                             \
    }

LIGHTNING(16)
LIGHTNING(32)
LIGHTNING(64)
LIGHTNING(128)

// Chunked prefill on tensor cores (mma.cuh): the same recurrence, a chunk of LC tokens at a
// time. With i, j the positions in the chunk (m tokens), S the state before it, and
// λ the head's decay,
//   o_i   = λ^(i+1) q_i S + Σ_{j<=i} λ^(i-j) (q_i · k_j) v_j
//   S_new = λ^m S + Σ_j λ^(m-1-j) k_j^T v_j.
// Block = 4 warps owning LW columns of one head's state (column b depends only on column b
// of the v's), grid = (ceil(hd / LW), n_heads). Per chunk, q, k (all dims) and the block's
// v columns are staged in shared memory as bf16 (v also scaled by λ^(m-1-j)), and the state
// as bf16; warp w then computes output rows w*16.. of the chunk (Q S, then the decayed
// causal scores Q K^T times V) and updates state rows w*32.. in f32 accumulators
// (K^T V' plus λ^m S). q, k, v, the scores and the state's copy for Q S are rounded to
// bf16, as in flash.cu; the state itself stays f32. Head size up to 128 (zero padded).
#define LC 64   // tokens per chunk
#define LW 64   // state columns per block
#define LHD 128 // head size the tiles hold

// Starts copying the f32 q, k rows (all LHD dims) and the block's LW v columns of tokens
// t0 .. t0 + m into rq, rk, rv (zeros past m and past hd). hd % 4 == 0. Whole block.
__device__ void lightning_fetch(float* rq, float* rk, float* rv, const float* base, size_t stride, int t0, int m, int hd, int c0) {
    for (int i = threadIdx.x; i < LC * LHD / 4; i += blockDim.x) {
        int j = i / (LHD / 4), a = (i % (LHD / 4)) * 4;
        bool ok = j < m && a < hd;
        const float* row = base + (size_t)(t0 + j) * stride;
        cp_async16(rq + j * LHD + a, ok ? row + a : base, ok);
        cp_async16(rk + j * LHD + a, ok ? row + hd + a : base, ok);
    }
    for (int i = threadIdx.x; i < LC * LW / 4; i += blockDim.x) {
        int j = i / (LW / 4), b = (i % (LW / 4)) * 4;
        bool ok = j < m && c0 + b < hd;
        cp_async16(rv + j * LW + b, ok ? base + (size_t)(t0 + j) * stride + 2 * hd + c0 + b : base, ok);
    }
    cp_async_commit();
}

// A warp's part of the state in mma accumulator layout, s[mt][nt][e] = S[warp*32 + mt*16
// + gid (+8 for e >= 2)][c0 + nt*8 + 2 tig (+1 for odd e)]: read from st (STORE false;
// zeros outside hd x hd) or written back (STORE true).
template <int NT, bool STORE>
__device__ __forceinline__ void state_tile(float (&s)[2][NT][4], float* st, int hd, int warp, int gid, int tig, int c0) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int a = warp * 32 + mt * 16 + gid + (e & 2) * 4, b = c0 + nt * 8 + tig * 2 + (e & 1);
                bool in = a < hd && b < hd;
                if (STORE) {
                    if (in) st[(size_t)a * hd + b] = s[mt][nt][e];
                } else {
                    s[mt][nt][e] = in ? st[(size_t)a * hd + b] : 0.f;
                }
            }
}

extern "C" __global__ void __launch_bounds__(128)
    lightning_chunked(const float* qkv, float* state, const float* decay, float* out, int n_tokens, int n_heads, int hd, int act) { PDL_ENTRY();
    constexpr int LDQ = LHD + 8, LDV = LW + 8, KS = LHD / 16, NT = LW / 8, CT = LC / 8;
    extern __shared__ __align__(16) u16 smem[];
    u16* qs = smem;             // [LC][LDQ] q
    u16* ks = qs + LC * LDQ;    // [LC][LDQ] k
    u16* vs = ks + LC * LDQ;    // [LC][LDV] v, the block's columns
    u16* vd = vs + LC * LDV;    // [LC][LDV] v * λ^(m-1-j)
    u16* sb = vd + LC * LDV;    // [LHD][LDV] the state before the chunk
    const int h = blockIdx.y, c0 = blockIdx.x * LW;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const float l2 = log2f(decay[h]);
    const size_t stride = (size_t)n_heads * 3 * hd, width = (size_t)n_heads * hd;
    const float* base = qkv + (size_t)h * 3 * hd;
    float* st = state + (size_t)h * hd * hd;

    // this warp's state rows warp*32 + mt*16 (+ gid, + 8), columns c0 + nt*8 + 2 tig (+1)
    float s[2][NT][4];
    state_tile<NT, false>(s, st, hd, warp, gid, tig, c0);

    // hd % 4 == 0: the next chunk's f32 q, k and v columns stream into `raw` (cp.async)
    // while this one is computed; otherwise each chunk is loaded directly
    const bool vec = (hd & 3) == 0;
    float* rq = (float*)(sb + LHD * LDV);  // [LC][LHD]
    float* rk = rq + LC * LHD;             // [LC][LHD]
    float* rv = rk + LC * LHD;             // [LC][LW]
    if (vec) lightning_fetch(rq, rk, rv, base, stride, 0, min(LC, n_tokens), hd, c0);
    for (int t0 = 0; t0 < n_tokens; t0 += LC) {
        const int m = min(LC, n_tokens - t0);
        if (vec) cp_async_wait<0>();
        __syncthreads();  // this chunk has landed; the previous chunk's tiles are no longer read
        if (vec) {
            for (int i = threadIdx.x; i < LC * LHD / 4; i += blockDim.x) {
                int j = i / (LHD / 4), a = (i % (LHD / 4)) * 4;
                float4 q = act_in(*(const float4*)&rq[j * LHD + a], act), k = act_in(*(const float4*)&rk[j * LHD + a], act);
                *(uint2*)&qs[j * LDQ + a] = make_uint2(pack_bf16(q.x, q.y), pack_bf16(q.z, q.w));
                *(uint2*)&ks[j * LDQ + a] = make_uint2(pack_bf16(k.x, k.y), pack_bf16(k.z, k.w));
            }
            for (int i = threadIdx.x; i < LC * LW / 4; i += blockDim.x) {
                int j = i / (LW / 4), b = (i % (LW / 4)) * 4;
                float4 v = act_in(*(const float4*)&rv[j * LW + b], act);
                float f = j < m ? exp2f((float)(m - 1 - j) * l2) : 0.f;
                *(uint2*)&vs[j * LDV + b] = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
                *(uint2*)&vd[j * LDV + b] = make_uint2(pack_bf16(v.x * f, v.y * f), pack_bf16(v.z * f, v.w * f));
            }
        } else {
            for (int i = threadIdx.x; i < LC * LHD; i += blockDim.x) {
                int j = i / LHD, a = i % LHD;
                bool ok = j < m && a < hd;
                const float* row = base + (size_t)(t0 + j) * stride;
                qs[j * LDQ + a] = f32_to_bf16(ok ? act_in(row[a], act) : 0.f);
                ks[j * LDQ + a] = f32_to_bf16(ok ? act_in(row[hd + a], act) : 0.f);
            }
            for (int i = threadIdx.x; i < LC * LW; i += blockDim.x) {
                int j = i / LW, b = i % LW;
                float v = (j < m && c0 + b < hd) ? act_in(base[(size_t)(t0 + j) * stride + 2 * hd + c0 + b], act) : 0.f;
                float f = j < m ? exp2f((float)(m - 1 - j) * l2) : 0.f;
                vs[j * LDV + b] = f32_to_bf16(v);
                vd[j * LDV + b] = f32_to_bf16(v * f);
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                int a = warp * 32 + mt * 16 + gid, b = nt * 8 + tig * 2;
                *(u32*)&sb[a * LDV + b] = pack_bf16(s[mt][nt][0], s[mt][nt][1]);
                *(u32*)&sb[(a + 8) * LDV + b] = pack_bf16(s[mt][nt][2], s[mt][nt][3]);
            }
        __syncthreads();
        if (vec && t0 + LC < n_tokens) lightning_fetch(rq, rk, rv, base, stride, t0 + LC, min(LC, n_tokens - t0 - LC), hd, c0);

        // outputs: rows i0 = warp*16 + gid and i1 = i0 + 8 of the chunk
        const int i0 = warp * 16 + gid, i1 = i0 + 8;
        u32 qf[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; kk++) ldm4(qf[kk], qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDQ + kk * 16 + (lane >> 4) * 8);
        float o[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
        // inter-chunk: λ^(i+1) q_i S
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                u32 b[4];
                ldm4t(b, sb + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDV + nt * 8 + (lane >> 4) * 8);
                mma(o[nt], qf[kk], b[0], b[1]);
                mma(o[nt + 1], qf[kk], b[2], b[3]);
            }
        const float g0 = exp2f((float)(i0 + 1) * l2), g1 = exp2f((float)(i1 + 1) * l2);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            o[nt][0] *= g0;
            o[nt][1] *= g0;
            o[nt][2] *= g1;
            o[nt][3] *= g1;
        }
        // intra-chunk: the decayed causal scores, then times v
        u32 pf[LC / 16][4];
        {
            float sc[CT][4];
#pragma unroll
            for (int ct = 0; ct < CT; ct++) {
                sc[ct][0] = sc[ct][1] = sc[ct][2] = sc[ct][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < KS; kk += 2) {
                    u32 b[4];
                    ldm4(b, ks + (ct * 8 + (lane & 7)) * LDQ + kk * 16 + (lane >> 3) * 8);
                    mma(sc[ct], qf[kk], b[0], b[1]);
                    mma(sc[ct], qf[kk + 1], b[2], b[3]);
                }
            }
#pragma unroll
            for (int ct = 0; ct < CT; ct++) {
                int j = ct * 8 + tig * 2;
                float d00 = j <= i0 ? exp2f((float)(i0 - j) * l2) : 0.f, d01 = j + 1 <= i0 ? exp2f((float)(i0 - j - 1) * l2) : 0.f;
                float d10 = j <= i1 ? exp2f((float)(i1 - j) * l2) : 0.f, d11 = j + 1 <= i1 ? exp2f((float)(i1 - j - 1) * l2) : 0.f;
                pf[ct / 2][(ct & 1) * 2] = pack_bf16(sc[ct][0] * d00, sc[ct][1] * d01);
                pf[ct / 2][(ct & 1) * 2 + 1] = pack_bf16(sc[ct][2] * d10, sc[ct][3] * d11);
            }
        }
#pragma unroll
        for (int kk = 0; kk < LC / 16; kk++)
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                u32 b[4];
                ldm4t(b, vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDV + nt * 8 + (lane >> 4) * 8);
                mma(o[nt], pf[kk], b[0], b[1]);
                mma(o[nt + 1], pf[kk], b[2], b[3]);
            }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int b = c0 + nt * 8 + tig * 2;
            float* r0 = out + (size_t)(t0 + i0) * width + (size_t)h * hd + b;
            float* r1 = r0 + 8 * width;
            if (i0 < m && b < hd) r0[0] = o[nt][0];
            if (i0 < m && b + 1 < hd) r0[1] = o[nt][1];
            if (i1 < m && b < hd) r1[0] = o[nt][2];
            if (i1 < m && b + 1 < hd) r1[1] = o[nt][3];
        }

        // state rows warp*32..: S = λ^m S + K^T V'
        const float dm = exp2f((float)m * l2);
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[mt][nt][e] *= dm;
#pragma unroll
        for (int kk = 0; kk < LC / 16; kk++) {
            u32 af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldm4t(af[mt], ks + (kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * LDQ + warp * 32 + mt * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                u32 b[4];
                ldm4t(b, vd + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDV + nt * 8 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma(s[mt][nt], af[mt], b[0], b[1]);
                    mma(s[mt][nt + 1], af[mt], b[2], b[3]);
                }
            }
        }
    }
    state_tile<NT, true>(s, st, hd, warp, gid, tig, c0);
}
