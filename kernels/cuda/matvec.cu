// Quantized matrix-vector products for decode (prepended: common.cuh, formats.cuh).
//
// y[p, r] = W_{e(p)}[r, :] · x[p / x_div, :] for every pair p = blockIdx.y.
// Dense use: ids = null (one matrix), x_div = 1, one pair per token.
// MoE decode: ids[p] = the expert of pair p; the experts of a stacked tensor lie
// `expert_stride` bytes apart; gate/up read the token's row (x_div = experts per token),
// down reads each pair's own activation (x_div = 1).
//
// A warp computes ROWS rows: each lane strides over the units of the row, loads the
// unit's inputs once and the ROWS weight units (independent 16-byte loads, so several are
// in flight), then the warp sums. Blocks of WARPS warps.

#define ROWS 4
#define WARPS 4

template <class F>
__device__ void matvec(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    int p = blockIdx.y;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    const float* xp = x + (size_t)(p / x_div) * cols;
    int lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
    if (r0 >= rows) return;
    int n = F::units(cols);
    float acc[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++) acc[i] = 0.f;
    if (r0 + ROWS <= rows) {
#pragma unroll 2
        for (int u = lane; u < n; u += 32) {
            typename F::X xu;
            F::load_x(xp, u, xu);
#pragma unroll
            for (int i = 0; i < ROWS; i++) acc[i] += F::dot(wp, rows, cols, r0 + i, u, xu);
        }
    } else {
        for (int u = lane; u < n; u += 32) {
            typename F::X xu;
            F::load_x(xp, u, xu);
            for (int i = 0; i < ROWS && r0 + i < rows; i++) acc[i] += F::dot(wp, rows, cols, r0 + i, u, xu);
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; i++) acc[i] = warp_sum(acc[i]);
    if (lane == 0)
        for (int i = 0; i < ROWS && r0 + i < rows; i++) y[(size_t)p * rows + r0 + i] = acc[i];
}

// Float matrices whose rows are not a whole number of 16-byte loads: one value at a time.
template <class F>
__device__ void matvec_scalar(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    int p = blockIdx.y;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    const float* xp = x + (size_t)(p / x_div) * cols;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (r >= rows) return;
    float acc = 0.f;
    for (int u = lane; u < cols; u += 32) acc += F::dot1(wp, cols, r, u, xp);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)p * rows + r] = acc;
}

#define ARGS const u8 *w, long long expert_stride, const int *ids, int rows, int cols, const float *x, int x_div, float *y
#define PASS w, expert_stride, ids, rows, cols, x, x_div, y
#define MATVEC(name, F) \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) name(ARGS) { matvec<F>(PASS); }
#define MATVEC_SCALAR(name, F) \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) name(ARGS) { matvec_scalar<F>(PASS); }

MATVEC(matvec_q8_0, Q8_0)
MATVEC(matvec_q4_k, Q4_K)
MATVEC(matvec_q6_k, Q6_K)
MATVEC(matvec_q4_0, Q4_0)
MATVEC(matvec_bf16, Half<true>)
MATVEC(matvec_f16, Half<false>)
MATVEC(matvec_f32, F32)
MATVEC_SCALAR(matvec_bf16_scalar, Half<true>)
MATVEC_SCALAR(matvec_f16_scalar, Half<false>)
MATVEC_SCALAR(matvec_f32_scalar, F32)
