// MoE routing and combination (prepended: common.cuh, formats.cuh).

#define MAX_EXPERTS_PER_LANE 8  // up to 256 experts
#define MAX_K 16

// One token's routing, by one warp: p = softmax(l) in f32, the top k of p (ties to the
// lower expert), weights renormalised over the k, into ids[0..k] and weights[0..k];
// counts[e] += 1 per choice. k <= MAX_K, n_experts <= 32 * MAX_EXPERTS_PER_LANE (checked by
// the launchers). l is read past L1 (route_fused's blocks wrote it during the kernel).
__device__ void topk_token(const float* l, int n_experts, int k, int* ids, float* weights, unsigned* counts) {
    int lane = threadIdx.x & 31;
    float p[MAX_EXPERTS_PER_LANE];
    const float NEG_INF = __int_as_float(0xff800000);
    float m = NEG_INF;
#pragma unroll
    for (int i = 0; i < MAX_EXPERTS_PER_LANE; i++) {
        int e = lane + 32 * i;
        p[i] = e < n_experts ? load_cg(l + e) : NEG_INF;
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
    // both arrays indexed by unrolled constants only, so that they stay in registers
    float chosen[MAX_K];
#pragma unroll
    for (int j = 0; j < MAX_K; j++) {
        if (j >= k) break;
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
#pragma unroll
        for (int i = 0; i < MAX_EXPERTS_PER_LANE; i++)
            if (arg == lane + 32 * i) p[i] = -1.f;
        chosen[j] = best * inv;
        total += chosen[j];
        if (lane == 0) {
            ids[j] = arg;
            atomicAdd(counts + arg, 1u);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < MAX_K; j++)
            if (j < k) weights[j] = chosen[j] / total;
    }
}

// Per token (one warp each) over the router's logits [n_tokens, n_experts]: topk_token.
// ids/weights: [n_tokens, k].
extern "C" __global__ void route_topk(const float* logits, int n_tokens, int n_experts, int k, int* ids, float* weights, unsigned* counts) { PDL_ENTRY();
    int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= n_tokens) return;
    topk_token(logits + (size_t)t * n_experts, n_experts, k, ids + t * k, weights + t * k, counts);
}

// The router's product and route_topk in one kernel (few tokens): block (r, t) computes
// logit r of token t as matvec.cu's matvec_wide does (the same sums), and the block that
// finishes token t's last logit runs topk_token on them (tickets[t] counts the blocks).
//
// A row of up to ROUTE_HELD 16-byte units per thread is read into registers before the PDL
// wait (the router's weights never depend on the kernel ahead, the norm that makes x), and
// summed in block_row_dot's order once x is there.
#define ROUTE_HELD 8
template <class F>
__device__ void route_fused(const u8* w, int n_experts, int cols, const float* x, int k, float* logits, int* ids, float* weights,
                            unsigned* counts, unsigned* tickets) {
    __shared__ float scratch[32];
    int r = blockIdx.x, t = blockIdx.y, n = F::units(cols);
    bool held = n <= ROUTE_HELD * (int)blockDim.x;
    typename F::WX wq[ROUTE_HELD];
    if (held) {
#pragma unroll
        for (int j = 0; j < ROUTE_HELD; j++) {
            int u = threadIdx.x + j * blockDim.x;
            if (u < n) F::load_w(w, n_experts, cols, r, u, wq[j]);
        }
    }
    PDL_ENTRY();
    const float* xt = x + (size_t)t * cols;
    float v;
    if (held) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < ROUTE_HELD; j++) {
            int u = threadIdx.x + j * blockDim.x;
            if (u < n) {
                typename F::X xu;
                F::load_x(xt, u, xu);
                acc += F::dotw(wq[j], u, xu);
            }
        }
        v = block_sum(acc, scratch);
    } else {
        v = block_row_dot<F>(w, n_experts, cols, xt, r, scratch);
    }
    if (threadIdx.x == 0) logits[(size_t)t * n_experts + r] = v;
    if (arrived_last(tickets + t, n_experts) && threadIdx.x < 32)
        topk_token(logits + (size_t)t * n_experts, n_experts, k, ids + t * k, weights + t * k, counts);
}

#define ROUTE_FUSED(name, F)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) name(const u8* w, int n_experts, int cols, const float* x, int k, float* logits, \
                                                        int* ids, float* weights, unsigned* counts, unsigned* tickets) {      \
        route_fused<F>(w, n_experts, cols, x, k, logits, ids, weights, counts, tickets);                                     \
    }
ROUTE_FUSED(route_fused_f32, F32)
ROUTE_FUSED(route_fused_bf16, Half<true>)
ROUTE_FUSED(route_fused_f16, Half<false>)

// out[t, :] = Σ_j weights[t, j] * y[t * k + j, :]
extern "C" __global__ void moe_combine(const float* y, const float* weights, int k, int width, float* out) { PDL_ENTRY();
    int t = blockIdx.y;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x)
        out[(size_t)t * width + c] = combine_at(y, weights, k, width, t, c);
}

// The MoE's norm and its router in one kernel, for one token (decode; MXR_FUSE bit 8).
// Block r of n_experts (1024 threads) computes the whole norm of the row (rownorm.cuh:
// x_out = rmsnorm(alpha x + beta Σ cw a) * w, the bits rmsnorm_fused makes with the same
// block size), writes its share of x_out (float4s [r per, (r + 1) per)) and of its int8
// form, and takes router row r's product with the normalised row from its registers; the
// block that finishes last runs topk_token. x is only read: blocks may still be reading it
// while others write their shares of x_out. The router's row and the norm's weights are
// read before the PDL wait. The launcher checks the shapes (width <= 8192, per a multiple
// of 8).
extern "C" __global__ void __launch_bounds__(1024)
    moe_norm_route_f32(const float* x, const float* a, const float* cw, int k_res, float alpha, float beta, const float* w, int width,
                       float eps, float* x_out, i8* xq, float* xd, const float* router, int n_experts, int k, float* logits, int* ids,
                       float* weights, unsigned* counts, unsigned* tickets) {
    __shared__ float scratch[32];
    int r = blockIdx.x, n4 = width >> 2, per = n4 / n_experts;
    const float4* w4 = (const float4*)w;
    const float4* g4 = (const float4*)(router + (size_t)r * width);
    float4 wv[NORM_REG], gv[NORM_REG];
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < n4) {
            wv[j] = w4[i];
            gv[j] = g4[i];
        }
    }
    PDL_ENTRY();
    float4 ys[NORM_REG];
    norm_row_regs(x, 0, a, cw, k_res, alpha, beta, wv, nullptr, width, eps, x_out, r * per, (r + 1) * per, xq, xd, ys);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < n4) acc += gv[j].x * ys[j].x + gv[j].y * ys[j].y + gv[j].z * ys[j].z + gv[j].w * ys[j].w;
    }
    float v = block_sum(acc, scratch);
    if (threadIdx.x == 0) logits[r] = v;
    if (arrived_last(tickets, n_experts) && threadIdx.x < 32) topk_token(logits, n_experts, k, ids, weights, counts);
}
