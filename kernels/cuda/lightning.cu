// Lightning attention (prepended: common.cuh): per head h with decay lambda_h,
//   S_t = lambda_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t          (S: HD x HD, f32)
// for any number of tokens, prefill or decode, reading and writing the state once.
// Column b of S depends only on column b of the v's, so a warp owns 32 columns of one head
// and keeps them in registers (S[:, b] is HD floats per lane); q, k and the warp's v columns
// of a chunk of tokens are staged in shared memory first (all loads of a chunk in flight at
// once), then the recurrence runs from shared memory alone.
//
// qkv: [n_tokens, n_heads * 3 * hd] (after SiLU), per head [q | k | v];
// state: [n_heads, hd, hd] row-major (S[a][b]); decay: [n_heads]; out: [n_tokens, n_heads * hd].
// HD is the register tile (16, 32, 64 or 128), hd <= HD the head size: rows a >= hd see
// q = k = 0 and so stay zero. grid = (ceil(hd / 32), n_heads), block = 32 threads.

#define CHUNK 32

template <int HD>
__device__ void lightning(const float* qkv, float* state, const float* decay, float* out, int n_tokens, int n_heads, int hd) {
    __shared__ __align__(16) float qs[CHUNK][HD];
    __shared__ __align__(16) float ks[CHUNK][HD];
    __shared__ float vs[CHUNK][32];
    int h = blockIdx.y, lane = threadIdx.x, b = blockIdx.x * 32 + lane;
    bool live = b < hd;
    float* st = state + (size_t)h * hd * hd;
    float s[HD];
#pragma unroll
    for (int a = 0; a < HD; a++) s[a] = (live && a < hd) ? st[a * hd + b] : 0.f;
    float lam = decay[h];
    size_t stride = (size_t)n_heads * 3 * hd;
    for (int t0 = 0; t0 < n_tokens; t0 += CHUNK) {
        int m = min(CHUNK, n_tokens - t0);
        __syncwarp();
#pragma unroll 8
        for (int i = lane; i < m * HD; i += 32) {
            int t = i / HD, a = i % HD;
            const float* row = qkv + (size_t)(t0 + t) * stride + (size_t)h * 3 * hd;
            qs[t][a] = a < hd ? row[a] : 0.f;
            ks[t][a] = a < hd ? row[hd + a] : 0.f;
        }
        for (int t = 0; t < m; t++) vs[t][lane] = live ? qkv[(size_t)(t0 + t) * stride + (size_t)h * 3 * hd + 2 * hd + b] : 0.f;
        __syncwarp();
        for (int t = 0; t < m; t++) {
            float v = vs[t][lane];
            float o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
#pragma unroll
            for (int a = 0; a < HD; a += 4) {
                float4 q4 = *(const float4*)&qs[t][a];
                float4 k4 = *(const float4*)&ks[t][a];
                s[a] = fmaf(lam, s[a], k4.x * v);
                s[a + 1] = fmaf(lam, s[a + 1], k4.y * v);
                s[a + 2] = fmaf(lam, s[a + 2], k4.z * v);
                s[a + 3] = fmaf(lam, s[a + 3], k4.w * v);
                o0 = fmaf(q4.x, s[a], o0);
                o1 = fmaf(q4.y, s[a + 1], o1);
                o2 = fmaf(q4.z, s[a + 2], o2);
                o3 = fmaf(q4.w, s[a + 3], o3);
            }
            if (live) out[(size_t)(t0 + t) * n_heads * hd + (size_t)h * hd + b] = (o0 + o1) + (o2 + o3);
        }
    }
    if (live) {
#pragma unroll
        for (int a = 0; a < HD; a++)
            if (a < hd) st[a * hd + b] = s[a];
    }
}

#define LIGHTNING(HD)                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(32) lightning_##HD(const float* qkv, float* state, const float* decay, float* out, int n_tokens, \
                                                                    int n_heads, int hd) {                                            \
        lightning<HD>(qkv, state, decay, out, n_tokens, n_heads, hd);                                                                      \
    }

LIGHTNING(16)
LIGHTNING(32)
LIGHTNING(64)
LIGHTNING(128)
