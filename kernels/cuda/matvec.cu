// Matrix-vector products for decode (prepended: common.cuh, formats.cuh).
//
// y[p, r] = W_{e(p)}[r, :] · x[p / x_div, :] for every pair p = blockIdx.y.
// Dense use: ids = null (one matrix), x_div = 1, one pair per token.
// MoE decode: ids[p] = the expert of pair p; the experts of a stacked tensor lie
// `expert_stride` bytes apart; gate/up read the token's row (x_div = experts per token),
// down reads each pair's own activation (x_div = 1).
//
// A warp computes ROWS rows: each lane strides over the units of the row, loads the
// unit's inputs once and the ROWS weight units (independent 16-byte loads, so several are
// in flight), then the warp sums. Blocks of WARPS warps. Quantized weights take int8
// activations (xq, xd: quantize_act's output), float weights f32 activations (x).

// All three are set by the launcher at compile time (-D), defaults here.
#ifndef ROWS
#define ROWS 4
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef UNROLL
#define UNROLL 2  // units in flight per lane in the main loop
#endif
// Q8_0's own launch shape (MXR_MATVEC_Q8_ROWS / _WARPS; by default the others')
#ifndef Q8_ROWS
#define Q8_ROWS ROWS
#endif
#ifndef Q8_WARPS
#define Q8_WARPS WARPS
#endif
#define LB_Q8 __launch_bounds__(32 * Q8_WARPS)
#define LB_ANY __launch_bounds__(32 * WARPS)

// The launch shape of a weight type's kernels: rows per warp R, warps per block W.
template <class F>
struct Shape {
    static constexpr int R = ROWS, W = WARPS;
};
template <>
struct Shape<Q8_0> {
    static constexpr int R = Q8_ROWS, W = Q8_WARPS;
};

// The loop shared by both activation kinds: Input::load(u) gives the unit's inputs,
// Input::dot(r, u, in) one row's product with them.
template <class Input>
__device__ void matvec_rows(const Input& in, int rows, int n_units, float* y_row) {
    constexpr int R = Shape<typename Input::Format>::R, W = Shape<typename Input::Format>::W;
    int lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * W + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    if (r0 + R <= rows) {
#pragma unroll UNROLL
        for (int u = lane; u < n_units; u += 32) {
            typename Input::T x;
            in.load(u, x);
#pragma unroll
            for (int i = 0; i < R; i++) acc[i] += in.dot(r0 + i, u, x);
        }
    } else {
        for (int u = lane; u < n_units; u += 32) {
            typename Input::T x;
            in.load(u, x);
            for (int i = 0; i < R && r0 + i < rows; i++) acc[i] += in.dot(r0 + i, u, x);
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = warp_sum(acc[i]);
    if (lane == 0)
        for (int i = 0; i < R && r0 + i < rows; i++) y_row[r0 + i] = acc[i];
}

template <class F>
struct QuantInput {
    typedef F Format;
    typedef typename F::XQ T;
    const u8* w;
    int rows, cols;
    const i8* xq;
    const float* xd;
    __device__ void load(int u, T& x) const { F::load_xq(xq, xd, u, x); }
    __device__ float dot(int r, int u, const T& x) const { return F::dotq(w, rows, cols, r, u, x); }
};

template <class F>
struct FloatInput {
    typedef F Format;
    typedef typename F::X T;
    const u8* w;
    int rows, cols;
    const float* x;
    __device__ void load(int u, T& v) const { F::load_x(x, u, v); }
    __device__ float dot(int r, int u, const T& v) const { return F::dot(w, rows, cols, r, u, v); }
};

template <class F>
__device__ void matvec_q(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const i8* xq, const float* xd, int x_div, float* y) {
    int p = blockIdx.y;
    size_t xrow = (size_t)(p / x_div);
    QuantInput<F> in{w + (ids ? (long long)ids[p] * expert_stride : 0ll), rows, cols, xq + xrow * cols, xd + xrow * (cols >> 5)};
    matvec_rows(in, rows, F::units(cols), y + (size_t)p * rows);
}

template <class F>
__device__ void matvec_f(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    int p = blockIdx.y;
    FloatInput<F> in{w + (ids ? (long long)ids[p] * expert_stride : 0ll), rows, cols, x + (size_t)(p / x_div) * cols};
    matvec_rows(in, rows, F::units(cols), y + (size_t)p * rows);
}

// Two quantized matrices of one type and width over the same int8 input in one launch
// (blockIdx.z picks the matrix): the MoE's gate and up products, the lightning layer's
// qkv and gate. Each has its own rows, expert stride and output.
template <class F>
__device__ void matvec2_q(const u8* w0, const u8* w1, long long s0, long long s1, const int* ids, int rows0, int rows1, int cols, const i8* xq,
                          const float* xd, int x_div, float* y0, float* y1) {
    bool second = blockIdx.z != 0;
    const u8* w = second ? w1 : w0;
    long long s = second ? s1 : s0;
    int rows = second ? rows1 : rows0, p = blockIdx.y;
    size_t xrow = (size_t)(p / x_div);
    QuantInput<F> in{w + (ids ? (long long)ids[p] * s : 0ll), rows, cols, xq + xrow * cols, xd + xrow * (cols >> 5)};
    matvec_rows(in, rows, F::units(cols), (second ? y1 : y0) + (size_t)p * rows);
}

// Float matrices whose rows are not a whole number of 16-byte loads: one value at a time,
// one row per warp.
template <class F>
__device__ void matvec_scalar(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    int p = blockIdx.y;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    const float* xp = x + (size_t)(p / x_div) * cols;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * Shape<F>::W + (threadIdx.x >> 5);
    if (r >= rows) return;
    float acc = 0.f;
    for (int u = lane; u < cols; u += 32) acc += F::dot1(wp, cols, r, u, xp);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)p * rows + r] = acc;
}

// Float matrices with few rows (the router): one block per (row, pair), the block's
// threads striding over the row's units.
template <class F>
__device__ void matvec_wide(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y) {
    __shared__ float scratch[32];
    int p = blockIdx.y, r = blockIdx.x;
    float acc = block_row_dot<F>(w + (ids ? (long long)ids[p] * expert_stride : 0ll), rows, cols, x + (size_t)(p / x_div) * cols, r, scratch);
    if (threadIdx.x == 0) y[(size_t)p * rows + r] = acc;
}

#define QARGS const u8 *w, long long expert_stride, const int *ids, int rows, int cols, const i8 *xq, const float *xd, int x_div, float *y
#define FARGS const u8 *w, long long expert_stride, const int *ids, int rows, int cols, const float *x, int x_div, float *y
#define MATVEC_Q(name, F, LB) \
    extern "C" __global__ void LB name(QARGS) { PDL_ENTRY(); matvec_q<F>(w, expert_stride, ids, rows, cols, xq, xd, x_div, y); }
#define MATVEC_F(name, F) \
    extern "C" __global__ void LB_ANY name(FARGS) { PDL_ENTRY(); matvec_f<F>(w, expert_stride, ids, rows, cols, x, x_div, y); }
#define MATVEC_SCALAR(name, F) \
    extern "C" __global__ void LB_ANY name(FARGS) { PDL_ENTRY(); matvec_scalar<F>(w, expert_stride, ids, rows, cols, x, x_div, y); }

#define Q2ARGS                                                                                                                  \
    const u8 *w0, const u8 *w1, long long s0, long long s1, const int *ids, int rows0, int rows1, int cols, const i8 *xq, const float *xd, \
        int x_div, float *y0, float *y1
#define MATVEC2_Q(name, F, LB)                                                                                                 \
    extern "C" __global__ void LB name(Q2ARGS) { PDL_ENTRY();                                                 \
        matvec2_q<F>(w0, w1, s0, s1, ids, rows0, rows1, cols, xq, xd, x_div, y0, y1);                                        \
    }

// Each quantized type's two kernels: one product, and two products of one input.
#define MATVEC_QUANT(t, F, LB) MATVEC2_Q(matvec2_##t, F, LB) MATVEC_Q(matvec_##t, F, LB)
MATVEC_QUANT(q8_0, Q8_0, LB_Q8)
MATVEC_QUANT(q4_k, Q4_K, LB_ANY)
MATVEC_QUANT(q6_k, Q6_K, LB_ANY)
MATVEC_QUANT(q4_0, Q4_0, LB_ANY)
MATVEC_F(matvec_bf16, Half<true>)
MATVEC_F(matvec_f16, Half<false>)
MATVEC_F(matvec_f32, F32)
#define MATVEC_WIDE(name, F) \
    extern "C" __global__ void __launch_bounds__(256) name(FARGS) { PDL_ENTRY(); matvec_wide<F>(w, expert_stride, ids, rows, cols, x, x_div, y); }
MATVEC_WIDE(matvec_wide_bf16, Half<true>)
MATVEC_WIDE(matvec_wide_f16, Half<false>)
MATVEC_WIDE(matvec_wide_f32, F32)
MATVEC_SCALAR(matvec_bf16_scalar, Half<true>)
MATVEC_SCALAR(matvec_f16_scalar, Half<false>)
MATVEC_SCALAR(matvec_f32_scalar, F32)
