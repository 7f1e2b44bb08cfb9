// Softmax attention (prepended: common.cuh): partial NeoX RoPE, and causal GQA attention
// over the KV cache with an online softmax.

// Positions come from device memory (*pos: the position of the first token), so a captured
// decode step replays at any position.

// Rotates the first rotary_dim dims of each head_dim-wide head of x [n_tokens, width]:
// pairs (i, i + rotary_dim/2), angle (*pos + t) * theta^(-2i/rotary_dim), in f64.
// One thread per (token, head, i).
extern "C" __global__ void rope(float* x, int n_tokens, int width, int head_dim, int rotary_dim, double theta, const int* pos) { PDL_ENTRY();
    int pos0 = *pos;
    int half = rotary_dim / 2, heads = width / head_dim;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * heads * half) return;
    int i = (int)(idx % half);
    long long th = idx / half;
    int t = (int)(th / heads), h = (int)(th % heads);
    double ang = (double)(pos0 + t) * pow(theta, -(double)(2 * i) / (double)rotary_dim);
    float c = (float)cos(ang), s = (float)sin(ang);
    float* p = x + (size_t)t * width + (size_t)h * head_dim;
    float a = p[i], b = p[i + half];
    p[i] = a * c - b * s;
    p[i + half] = b * c + a * s;
}

// The rotation table of partial NeoX RoPE for the positions *pos + t, t < n_tokens:
// cs[t * half + i] = (cos, sin) of (*pos + t) * theta^(-2i/rotary_dim), in f64 rounded to
// f32 as rope computes them. The attention kernels and kv_append_rope rotate with it.
extern "C" __global__ void rope_table(float2* cs, int n_tokens, int rotary_dim, double theta, const int* pos) { PDL_ENTRY();
    int half = rotary_dim / 2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * half) return;
    int t = (int)(idx / half), i = (int)(idx % half);
    double ang = (double)(*pos + t) * pow(theta, -(double)(2 * i) / (double)rotary_dim);
    cs[idx] = make_float2((float)cos(ang), (float)sin(ang));
}

// cache[*pos + t, :] = src[t, :] for t < n_tokens (rows of `width`), f32 or bf16 cache
// (rounded to nearest even).
__device__ __forceinline__ void kv_store(float* c, float v) { *c = v; }
__device__ __forceinline__ void kv_store(u16* c, float v) { *c = f32_to_bf16(v); }
__device__ __forceinline__ float kv_load(const float* c) { return *c; }
__device__ __forceinline__ float kv_load(const u16* c) { return bf16_to_f32(*c); }
// four consecutive elements (16-byte aligned for f32, 8-byte for bf16)
__device__ __forceinline__ float4 kv_load4(const float* c) { return *(const float4*)c; }
__device__ __forceinline__ float4 kv_load4(const u16* c) {
    uint2 u = *(const uint2*)c;
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}

template <typename KV>
__device__ void kv_append(const float* src, KV* cache, const int* pos, int n_tokens, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)n_tokens * width) kv_store(cache + (size_t)(*pos) * width + i, src[i]);
}
// kv_append of keys after partial NeoX RoPE (heads of head_dim, table cs): RoPE fused into
// the append.
template <typename KV>
__device__ void kv_append_rope(const float* src, KV* cache, const int* pos, int n_tokens, int width, int head_dim, int rd, const float2* cs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tokens * width) return;
    int t = (int)(i / width), c = (int)(i % width), h = c / head_dim, j = c % head_dim;
    float v = roped(src + (size_t)t * width + (size_t)h * head_dim, j, rd, cs + (size_t)t * (rd >> 1));
    kv_store(cache + (size_t)(*pos) * width + i, v);
}
extern "C" __global__ void kv_append_rope_f32(const float* src, float* cache, const int* pos, int n_tokens, int width, int head_dim, int rd,
                                              const float2* cs) { PDL_ENTRY();
    kv_append_rope(src, cache, pos, n_tokens, width, head_dim, rd, cs);
}
extern "C" __global__ void kv_append_rope_bf16(const float* src, u16* cache, const int* pos, int n_tokens, int width, int head_dim, int rd,
                                               const float2* cs) { PDL_ENTRY();
    kv_append_rope(src, cache, pos, n_tokens, width, head_dim, rd, cs);
}
extern "C" __global__ void kv_append_f32(const float* src, float* cache, const int* pos, int n_tokens, int width) { PDL_ENTRY();
    kv_append(src, cache, pos, n_tokens, width);
}
extern "C" __global__ void kv_append_bf16(const float* src, u16* cache, const int* pos, int n_tokens, int width) { PDL_ENTRY();
    kv_append(src, cache, pos, n_tokens, width);
}

// q8_0 caches: int8 values [rows, width] and f32 block scales [rows, width / 32], each block
// quantized as ggml's quantize_row_q8_0 (quantize_block32; one warp per 32-value block,
// width % 32 == 0 and head_dim % 32 == 0, so a block never spans two heads). Keys are
// rotated by partial NeoX RoPE on the way in (rd > 0, table cs), as kv_append_rope does.
__device__ void kv_append_q8(const float* src, i8* cq, float* cd, const int* pos, int n_tokens, int width, int head_dim, int rd,
                             const float2* cs) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tokens * width) return;  // whole warps: n_tokens * width % 32 == 0
    int t = (int)(i / width), c = (int)(i % width), h = c / head_dim, j = c % head_dim;
    float v = roped(src + (size_t)t * width + (size_t)h * head_dim, j, rd, cs + (size_t)t * (rd >> 1));
    size_t r = (size_t)(*pos + t);
    quantize_block32(v, threadIdx.x & 31, cq + r * width + (c & ~31), cd + r * (width / 32) + c / 32);
}
extern "C" __global__ void kv_append_rope_q8(const float* src, i8* cq, float* cd, const int* pos, int n_tokens, int width, int head_dim,
                                             int rd, const float2* cs) { PDL_ENTRY();
    kv_append_q8(src, cq, cd, pos, n_tokens, width, head_dim, rd, cs);
}
extern "C" __global__ void kv_append_plain_q8(const float* src, i8* cq, float* cd, const int* pos, int n_tokens, int width) { PDL_ENTRY();
    kv_append_q8(src, cq, cd, pos, n_tokens, width, width, 0, nullptr);
}

#define TILE 32
#define MAX_GROUP 16

// Shared staging of one block: a tile of keys (transposed, kt[c][j], so that lane j reads
// key j without bank conflicts) and values of one KV head, and the group's query rows.
template <int HD>
struct Stage {
    float kt[HD][TILE];
    __align__(16) float v[TILE][HD];
    float q[MAX_GROUP][HD];
};

// Loads keys and values j0 .. min(j0 + TILE, end) of KV head g into kt / vt (zeros past
// `end` and past hd), with 16-byte loads when rows allow them. Whole block.
template <int HD, typename KV>
__device__ void stage_tile(float (*kt)[TILE], float (*vt)[HD], const KV* kc, const KV* vc, int g, int kv_dim, int hd, int j0, int end) {
    if ((hd & 3) == 0) {
        // keys: consecutive threads take consecutive keys (conflict-free transposed
        // stores); values: consecutive threads take consecutive columns (coalesced)
#pragma unroll 4
        for (int i = threadIdx.x; i < TILE * HD / 4; i += blockDim.x) {
            int j = i % TILE, c = (i / TILE) * 4;
            bool ok = j0 + j < end && c < hd;
            float4 k = ok ? kv_load4(kc + (size_t)(j0 + j) * kv_dim + (size_t)g * hd + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            kt[c][j] = k.x;
            kt[c + 1][j] = k.y;
            kt[c + 2][j] = k.z;
            kt[c + 3][j] = k.w;
        }
#pragma unroll 4
        for (int i = threadIdx.x; i < TILE * HD / 4; i += blockDim.x) {
            int j = i / (HD / 4), c = (i % (HD / 4)) * 4;
            bool ok = j0 + j < end && c < hd;
            *(float4*)&vt[j][c] = ok ? kv_load4(vc + (size_t)(j0 + j) * kv_dim + (size_t)g * hd + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        return;
    }
    for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
        int j = i / HD, c = i % HD;
        bool ok = j0 + j < end && c < hd;
        size_t off = (size_t)(j0 + j) * kv_dim + (size_t)g * hd + c;
        kt[c][j] = ok ? kv_load(kc + off) : 0.f;
        vt[j][c] = ok ? kv_load(vc + off) : 0.f;
    }
}

// Online softmax of this warp's query (st.q[warp]) over keys [j_begin, j_end) of KV head g:
// running max m, denominator l and unnormalised output acc (lane's dims lane + 32 i).
// Every warp of the block must call it with the same range (it synchronises the block).
template <int HD, typename KV>
__device__ void scan(Stage<HD>& st, const KV* kc, const KV* vc, int g, int kv_dim, int hd, int j_begin, int j_end, float scale,
                     float& m, float& l, float* acc) {
    constexpr int PER = HD / 32;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int j0 = j_begin; j0 < j_end; j0 += TILE) {
        __syncthreads();
        stage_tile<HD, KV>(st.kt, st.v, kc, vc, g, kv_dim, hd, j0, j_end);
        __syncthreads();
        float sc = 0.f;
#pragma unroll 8
        for (int c = 0; c < HD; c++) sc = fmaf(st.q[warp][c], st.kt[c][lane], sc);
        bool valid = j0 + lane < j_end;
        sc = valid ? sc * scale : __int_as_float(0xff800000);
        float m_new = fmaxf(m, warp_max(sc));
        float corr = expf(m - m_new);
        float p = valid ? expf(sc - m_new) : 0.f;
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < PER; i++) acc[i] *= corr;
        int n_keys = min(TILE, j_end - j0);
        for (int j = 0; j < n_keys; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
            for (int i = 0; i < PER; i++) acc[i] = fmaf(pj, st.v[j][lane + 32 * i], acc[i]);
        }
        m = m_new;
    }
}

// Prefill: out[t, h, :] = softmax_j(q[t, h] · k[j, g] * scale) v[j, g] over j <= *pos + t,
// g = h / group. q: [n_tokens, n_heads * hd]; kc, vc: [>= *pos + n_tokens, n_kv_heads * hd].
// grid = (ceil(n_tokens / QT), n_kv_heads), block = group warps: warp w is query head
// g * group + w for the QT queries of the tile, so each tile of keys and values staged in
// shared memory serves group x QT query rows. Keys are stored transposed (kt[c][j]) so
// that lane j scores key j without bank conflicts; each lane keeps QT x HD/32 outputs.
#define QT 4
template <int HD>
__device__ void attend(const float* q, const float* kc, const float* vc, float* out, int n_tokens, int n_heads, int n_kv_heads, int hd, const int* pos,
                       float scale) {
    constexpr int PER = HD / 32;
    __shared__ float kt[HD][TILE];
    __shared__ __align__(16) float vt[TILE][HD];
    __shared__ float qs[MAX_GROUP / 2][QT][HD];
    int g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int group = blockDim.x >> 5, h = g * group + warp;
    int t0 = blockIdx.x * QT, nq = min(QT, n_tokens - t0), pos0 = *pos, kv_dim = n_kv_heads * hd;
    for (int i = lane; i < QT * HD; i += 32) {
        int t = i / HD, c = i % HD;
        qs[warp][t][c] = (t < nq && c < hd) ? q[(size_t)(t0 + t) * n_heads * hd + (size_t)h * hd + c] : 0.f;
    }
    float m[QT], l[QT], acc[QT][PER];
#pragma unroll
    for (int t = 0; t < QT; t++) {
        m[t] = __int_as_float(0xff800000);
        l[t] = 0.f;
#pragma unroll
        for (int i = 0; i < PER; i++) acc[t][i] = 0.f;
    }
    int end = pos0 + t0 + nq;  // keys 0..end-1 are seen by some query of the tile
    for (int j0 = 0; j0 < end; j0 += TILE) {
        __syncthreads();
        stage_tile<HD, float>(kt, vt, kc, vc, g, kv_dim, hd, j0, end);
        __syncthreads();
        float sc[QT];
#pragma unroll
        for (int t = 0; t < QT; t++) sc[t] = 0.f;
#pragma unroll 4
        for (int c = 0; c < HD; c++) {
            float k = kt[c][lane];
#pragma unroll
            for (int t = 0; t < QT; t++) sc[t] = fmaf(qs[warp][t][c], k, sc[t]);
        }
        float p[QT];
#pragma unroll
        for (int t = 0; t < QT; t++) {
            bool valid = t < nq && j0 + lane <= pos0 + t0 + t;
            float s = valid ? sc[t] * scale : __int_as_float(0xff800000);
            float m_new = fmaxf(m[t], warp_max(s));
            // a query with no valid key in this tile keeps m = -inf: guard the exponent
            float corr = m_new == m[t] ? 1.f : expf(m[t] - m_new);
            p[t] = valid ? expf(s - m_new) : 0.f;
            l[t] = l[t] * corr + warp_sum(p[t]);
#pragma unroll
            for (int i = 0; i < PER; i++) acc[t][i] *= corr;
            m[t] = m_new;
        }
        int n_keys = min(TILE, end - j0);
        for (int j = 0; j < n_keys; j++) {
            float v[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) v[i] = vt[j][lane + 32 * i];
#pragma unroll
            for (int t = 0; t < QT; t++) {
                float pj = __shfl_sync(0xffffffffu, p[t], j);
#pragma unroll
                for (int i = 0; i < PER; i++) acc[t][i] = fmaf(pj, v[i], acc[t][i]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < QT; t++) {
        if (t >= nq) break;
        float inv = 1.f / l[t];
        float* o = out + (size_t)(t0 + t) * n_heads * hd + (size_t)h * hd;
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (lane + 32 * i < hd) o[lane + 32 * i] = acc[t][i] * inv;
    }
}

// Decode (one query at position *pos) split over the keys: block (g, s) scans its share of
// keys 0..*pos for the group of KV head g and writes, per query head h, the partial
// (m, l, acc[hd]) to part[(h * splits + s) * (hd + 2)]. The split count is fixed by the
// launcher (from the cache's capacity), so a captured graph serves every position.
template <int HD, typename KV>
__device__ void attend_split(const float* q, const KV* kc, const KV* vc, float* part, int n_heads, int n_kv_heads, int hd, const int* pos,
                             float scale) {
    constexpr int PER = HD / 32;
    __shared__ Stage<HD> st;
    int g = blockIdx.x, s = blockIdx.y, splits = gridDim.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int group = blockDim.x >> 5, h = g * group + warp;
    for (int c = lane; c < HD; c += 32) st.q[warp][c] = c < hd ? q[(size_t)h * hd + c] : 0.f;
    int len = *pos + 1, per = (len + splits - 1) / splits;
    int j_begin = min(len, s * per), j_end = min(len, j_begin + per);
    float m = __int_as_float(0xff800000), l = 0.f, acc[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) acc[i] = 0.f;
    scan<HD, KV>(st, kc, vc, g, n_kv_heads * hd, hd, j_begin, j_end, scale, m, l, acc);
    float* p = part + ((size_t)h * splits + s) * (hd + 2);
    if (lane == 0) {
        p[0] = m;
        p[1] = l;
    }
#pragma unroll
    for (int i = 0; i < PER; i++)
        if (lane + 32 * i < hd) p[2 + lane + 32 * i] = acc[i];
}

// out[h, :] from the splits' partials: one block per query head. The block finds the
// maximum m and each split's weight exp(m_s - m) (in shared memory, with the denominator),
// then each thread sums one dim over the splits, several loads in flight. splits <= 1024.
extern "C" __global__ void attend_combine(const float* part, int splits, int hd, float* out) { PDL_ENTRY();
    __shared__ float w[1024];
    __shared__ float scratch[32];
    int h = blockIdx.x, stride = hd + 2;
    const float* p = part + (size_t)h * splits * stride;
    float m = __int_as_float(0xff800000);
    for (int s = threadIdx.x; s < splits; s += blockDim.x) m = fmaxf(m, p[(size_t)s * stride]);
    m = block_max(m, scratch);
    float part_l = 0.f;
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        float ls = p[(size_t)s * stride + 1];
        float ws = ls > 0.f ? expf(p[(size_t)s * stride] - m) : 0.f;
        w[s] = ws;
        part_l += ws * ls;
    }
    float l = block_sum(part_l, scratch);  // its barriers also publish w
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int s = 0;
        for (; s + 4 <= splits; s += 4) {
            a0 = fmaf(w[s], p[(size_t)s * stride + 2 + c], a0);
            a1 = fmaf(w[s + 1], p[(size_t)(s + 1) * stride + 2 + c], a1);
            a2 = fmaf(w[s + 2], p[(size_t)(s + 2) * stride + 2 + c], a2);
            a3 = fmaf(w[s + 3], p[(size_t)(s + 3) * stride + 2 + c], a3);
        }
        for (; s < splits; s++) a0 = fmaf(w[s], p[(size_t)s * stride + 2 + c], a0);
        out[(size_t)h * hd + c] = ((a0 + a1) + (a2 + a3)) / l;
    }
}

#define ATTEND(HD)                                                                                                                   \
    extern "C" __global__ void attend_##HD(const float* q, const float* kc, const float* vc, float* out, int n_heads, int n_kv_heads, \
                                           int n_tokens, int hd, const int* pos, float scale) { PDL_ENTRY();                                    \
        attend<HD>(q, kc, vc, out, n_tokens, n_heads, n_kv_heads, hd, pos, scale);                                                 \
    }                                                                                                                                \
    extern "C" __global__ void attend_split_f32_##HD(const float* q, const float* kc, const float* vc, float* part, int n_heads,    \
                                                     int n_kv_heads, int hd, const int* pos, float scale) { PDL_ENTRY();                           \
        attend_split<HD, float>(q, kc, vc, part, n_heads, n_kv_heads, hd, pos, scale);                                             \
    }                                                                                                                                \
    extern "C" __global__ void attend_split_bf16_##HD(const float* q, const u16* kc, const u16* vc, float* part, int n_heads,       \
                                                      int n_kv_heads, int hd, const int* pos, float scale) { PDL_ENTRY();                          \
        attend_split<HD, u16>(q, kc, vc, part, n_heads, n_kv_heads, hd, pos, scale);                                               \
    }

ATTEND(32)
ATTEND(64)
ATTEND(128)
