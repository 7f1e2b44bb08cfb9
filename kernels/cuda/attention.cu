// Softmax attention (prepended: common.cuh): partial NeoX RoPE, and causal GQA attention
// over the KV cache with an online softmax.

// Positions come from device memory (*pos: the position of the first token), so a captured
// decode step replays at any position.

// Rotates the first rotary_dim dims of each head_dim-wide head of x [n_tokens, width]:
// pairs (i, i + rotary_dim/2), angle (*pos + t) * theta^(-2i/rotary_dim), in f64.
// One thread per (token, head, i).
extern "C" __global__ void rope(float* x, int n_tokens, int width, int head_dim, int rotary_dim, double theta, const int* pos) {
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

// cache[*pos + t, :] = src[t, :] for t < n_tokens (rows of `width`).
extern "C" __global__ void kv_append(const float* src, float* cache, const int* pos, int n_tokens, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)n_tokens * width) cache[(size_t)(*pos) * width + i] = src[i];
}

#define TILE 32
#define MAX_GROUP 16

// out[t, h, :] = softmax_j(q[t, h] · k[j, g] * scale) v[j, g] over j <= *pos + t, where
// g = h / group. q: [n_tokens, n_heads * hd]; kc, vc: [>= *pos + n_tokens, n_kv_heads * hd];
// HD (32, 64, 128) is the tile width, hd <= HD the head size (dims past hd read as zero).
// grid = (n_tokens, n_kv_heads), block = group warps: warp w is query head g * group + w,
// and the warps share each tile of 32 keys and values staged in shared memory. In a tile,
// lane j scores key j; then every lane accumulates its HD/32 output dims.
template <int HD>
__device__ void attend(const float* q, const float* kc, const float* vc, float* out, int n_heads, int n_kv_heads, int hd, const int* pos, float scale) {
    int pos0 = *pos;
    constexpr int PER = HD / 32;
    __shared__ float ksh[TILE][HD + 1];
    __shared__ float vsh[TILE][HD];
    __shared__ float qsh[MAX_GROUP][HD];
    int t = blockIdx.x, g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int group = blockDim.x >> 5, h = g * group + warp;
    int kv_dim = n_kv_heads * hd, len = pos0 + t + 1;
    const float* qt = q + (size_t)t * n_heads * hd + (size_t)h * hd;
    for (int c = lane; c < HD; c += 32) qsh[warp][c] = c < hd ? qt[c] : 0.f;
    float m = __int_as_float(0xff800000), l = 0.f, acc[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) acc[i] = 0.f;
    for (int j0 = 0; j0 < len; j0 += TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < TILE * HD; i += blockDim.x) {
            int j = i / HD, c = i % HD;
            bool ok = j0 + j < len && c < hd;
            size_t off = (size_t)(j0 + j) * kv_dim + (size_t)g * hd + c;
            ksh[j][c] = ok ? kc[off] : 0.f;
            vsh[j][c] = ok ? vc[off] : 0.f;
        }
        __syncthreads();
        float sc = 0.f;
#pragma unroll 8
        for (int c = 0; c < HD; c++) sc = fmaf(qsh[warp][c], ksh[lane][c], sc);
        bool valid = j0 + lane < len;
        sc = valid ? sc * scale : __int_as_float(0xff800000);
        float m_new = fmaxf(m, warp_max(sc));
        float corr = expf(m - m_new);
        float p = valid ? expf(sc - m_new) : 0.f;
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < PER; i++) acc[i] *= corr;
        int n_keys = min(TILE, len - j0);
        for (int j = 0; j < n_keys; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
            for (int i = 0; i < PER; i++) acc[i] = fmaf(pj, vsh[j][lane + 32 * i], acc[i]);
        }
        m = m_new;
    }
    float inv = 1.f / l;
    float* o = out + (size_t)t * n_heads * hd + (size_t)h * hd;
#pragma unroll
    for (int i = 0; i < PER; i++)
        if (lane + 32 * i < hd) o[lane + 32 * i] = acc[i] * inv;
}

#define ATTEND(HD)                                                                                                             \
    extern "C" __global__ void attend_##HD(const float* q, const float* kc, const float* vc, float* out, int n_heads, int n_kv_heads, \
                                           int hd, const int* pos, float scale) {                                             \
        attend<HD>(q, kc, vc, out, n_heads, n_kv_heads, hd, pos, scale);                                                          \
    }

ATTEND(32)
ATTEND(64)
ATTEND(128)
