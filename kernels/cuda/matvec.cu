// Quantized matrix-vector products for decode (prepended: common.cuh, formats.cuh).
//
// y[p, r] = W_{e(p)}[r, :] · x[p / x_div, :] for every pair p = blockIdx.y.
// Dense use: ids = null (one matrix), x_div = 1, one pair per token.
// MoE decode: ids[p] = the expert of pair p; the experts of a stacked tensor lie
// `expert_stride` bytes apart; gate/up read the token's row (x_div = experts per token),
// down reads each pair's own activation (x_div = 1).
// One warp per output row, lanes striding over the row's units (16-byte loads).

template <class F>
__device__ void matvec(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    int p = blockIdx.y;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    const float* xp = x + (size_t)(p / x_div) * cols;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    int n = F::units(cols);
    float acc = 0.f;
#pragma unroll 4
    for (int u = lane; u < n; u += 32) acc += F::dot(wp, rows, cols, r, u, xp);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)p * rows + r] = acc;
}

#define MATVEC(name, F)                                                                                                          \
    extern "C" __global__ void name(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, \
                                    int x_div, float* y) {                                                                       \
        matvec<F>(w, expert_stride, ids, rows, cols, x, x_div, y);                                                              \
    }

MATVEC(matvec_q8_0, Q8_0)
MATVEC(matvec_q4_k, Q4_K)
MATVEC(matvec_q6_k, Q6_K)
MATVEC(matvec_q4_0, Q4_0)
MATVEC(matvec_bf16, Half<true>)
MATVEC(matvec_f16, Half<false>)
MATVEC(matvec_f32, F32)
