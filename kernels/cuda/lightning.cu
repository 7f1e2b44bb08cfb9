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
// qkv: [n_tokens, n_heads * 3 * hd] (after SiLU), per head [q | k | v];
// state: [n_heads, hd, hd] row-major (S[a][b]); decay: [n_heads]; out: [n_tokens, n_heads * hd].
// HD is the register tile (16, 32, 64 or 128), hd <= HD the head size: rows a >= hd see
// q = k = 0 and so stay zero. grid = (ceil(hd / 8), n_heads), block = 32 threads.

#define CHUNK 16

template <int HD>
__device__ void lightning(const float* qkv, float* state, const float* decay, float* out, int n_tokens, int n_heads, int hd) {
    constexpr int R = HD / 4, PAD = R + 4;
    __shared__ __align__(16) float qs[CHUNK][4 * PAD];
    __shared__ __align__(16) float ks[CHUNK][4 * PAD];
    __shared__ float vs[CHUNK][8];
    int h = blockIdx.y, lane = threadIdx.x, col = lane >> 2, part = lane & 3;
    int b = blockIdx.x * 8 + col;
    bool live = b < hd;
    float* st = state + (size_t)h * hd * hd;
    float s[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        int a = part * R + i;
        s[i] = (live && a < hd) ? st[a * hd + b] : 0.f;
    }
    float lam = decay[h];
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
                *(float4*)&qs[t][pa] = a < hd ? *(const float4*)(row + a) : zero;
                *(float4*)&ks[t][pa] = a < hd ? *(const float4*)(row + hd + a) : zero;
            }
        } else {
#pragma unroll 8
            for (int i = lane; i < m * HD; i += 32) {
                int t = i / HD, a = i % HD, pa = (a / R) * PAD + a % R;
                const float* row = qkv + (size_t)(t0 + t) * stride + (size_t)h * 3 * hd;
                qs[t][pa] = a < hd ? row[a] : 0.f;
                ks[t][pa] = a < hd ? row[hd + a] : 0.f;
            }
        }
        for (int i = lane; i < m * 8; i += 32) {
            int t = i >> 3, c = blockIdx.x * 8 + (i & 7);
            vs[t][i & 7] = c < hd ? qkv[(size_t)(t0 + t) * stride + (size_t)h * 3 * hd + 2 * hd + c] : 0.f;
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
                                                                    int n_heads, int hd) {                                            \
        lightning<HD>(qkv, state, decay, out, n_tokens, n_heads, hd);                                                                  \
    }

LIGHTNING(16)
LIGHTNING(32)
LIGHTNING(64)
LIGHTNING(128)
