// MoE routing and combination (prepended: common.cuh).

#define MAX_EXPERTS_PER_LANE 8  // up to 256 experts
#define MAX_K 16

// Per token (one warp each): p = softmax(logits) in f32, the top k of p (ties to the lower
// expert), weights renormalised over the k. ids/weights: [n_tokens, k]; counts[e] += 1 per
// choice. k <= MAX_K, n_experts <= 32 * MAX_EXPERTS_PER_LANE (checked by the launcher).
extern "C" __global__ void route_topk(const float* logits, int n_tokens, int n_experts, int k, int* ids, float* weights, unsigned* counts) { PDL_ENTRY();
    int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (t >= n_tokens) return;
    const float* l = logits + (size_t)t * n_experts;
    float p[MAX_EXPERTS_PER_LANE];
    const float NEG_INF = __int_as_float(0xff800000);
    float m = NEG_INF;
#pragma unroll
    for (int i = 0; i < MAX_EXPERTS_PER_LANE; i++) {
        int e = lane + 32 * i;
        p[i] = e < n_experts ? l[e] : NEG_INF;
        m = fmaxf(m, p[i]);
    }
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_EXPERTS_PER_LANE; i++) {
        int e = lane + 32 * i;
        p[i] = e < n_experts ? expf(p[i] - m) : -1.f;
        s += e < n_experts ? p[i] : 0.f;
    }
    s = warp_sum(s);
    float inv = 1.f / s, total = 0.f;
    float chosen[MAX_K];
    for (int j = 0; j < k; j++) {
        // Best of this lane (lowest index on ties), then across lanes.
        float best = -1.f;
        int arg = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < MAX_EXPERTS_PER_LANE; i++)
            if (p[i] > best) { best = p[i]; arg = lane + 32 * i; }
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, o);
            int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
        }
        if ((arg & 31) == lane) p[arg >> 5] = -1.f;
        chosen[j] = best * inv;
        total += chosen[j];
        if (lane == 0) {
            ids[t * k + j] = arg;
            atomicAdd(counts + arg, 1u);
        }
    }
    if (lane == 0)
        for (int j = 0; j < k; j++) weights[t * k + j] = chosen[j] / total;
}

// out[t, :] = Σ_j weights[t, j] * y[t * k + j, :]
extern "C" __global__ void moe_combine(const float* y, const float* weights, int k, int width, float* out) { PDL_ENTRY();
    int t = blockIdx.y;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += weights[t * k + j] * y[((size_t)t * k + j) * width + c];
        out[(size_t)t * width + c] = acc;
    }
}
