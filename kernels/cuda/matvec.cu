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
// activations (xq, xd: quantize_act's output), float weights f32 activations (x). The
// lane's loop is either unrolled (UNROLL units per step) or software-pipelined (the next
// unit's loads issued before the current unit's products; `Pipelined`), and Q4_K's rows
// may first be copied to shared memory (`Staged`).

// All of these are set by the launcher at compile time (-D), defaults here.
#ifndef ROWS
#define ROWS 4
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef UNROLL
#define UNROLL 2  // units in flight per lane in the main loop
#endif
// MXR_MATVEC_PIPELINE: the types that run software-pipelined (matvec_pipelined: each lane
// loads its next unit while it computes the current one) instead of the UNROLL loop, a bit
// set: 1 Q8_0, 2 Q6_K, 4 Q4_0, 8 Q4_K, 16 the float types (kernels/src/cuda/mod.rs)
#ifndef PIPELINE
#define PIPELINE 7
#endif
// MXR_MATVEC_STAGE: 1 copies each warp's rows of a `Staged` type into shared memory
// (cp.async) before it computes, when the launcher gives the block room for them; 0
// (default) never
#ifndef STAGE
#define STAGE 0
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

// One step of a lane in matvec_pipelined: unit u's inputs and its R rows' weights
// loaded, or multiplied.
template <class Input, int R>
__device__ __forceinline__ void load_step(const Input& in, int r0, int u, typename Input::T& x, typename Input::W (&w)[R]) {
    in.load(u, x);
#pragma unroll
    for (int i = 0; i < R; i++) in.load_w(r0 + i, u, w[i]);
}
template <class Input, int R>
__device__ __forceinline__ void dot_step(const Input& in, int u, const typename Input::T& x, const typename Input::W (&w)[R], float (&acc)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] += in.dotw(w[i], u, x);
}

// A lane's units of R whole rows, software-pipelined: the next unit's loads are issued
// before the current unit's products, in two register sets taken in turn. The loads sit in
// their own branch ahead of the products, so ptxas cannot sink them below.
template <class Input, int R>
__device__ void matvec_pipelined(const Input& in, int r0, int lane, int n_units, float (&acc)[R]) {
    typename Input::T xa, xb;
    typename Input::W wa[R], wb[R];
    int u = lane;
    if (u >= n_units) return;
    load_step<Input, R>(in, r0, u, xa, wa);
    for (;;) {
        bool more = u + 32 < n_units;
        if (more) load_step<Input, R>(in, r0, u + 32, xb, wb);
        dot_step<Input, R>(in, u, xa, wa, acc);
        if (!more) return;
        u += 32;
        more = u + 32 < n_units;
        if (more) load_step<Input, R>(in, r0, u + 32, xa, wa);
        dot_step<Input, R>(in, u, xb, wb, acc);
        if (!more) return;
        u += 32;
    }
}

// Whether a type's kernels run software-pipelined (PIPELINE's bits). By default Q8_0, Q6_K
// and Q4_0: on an H200 (`mxr bench --kernels`, ninth session) the pipeline lifted Q8_0's
// products from 86 / 81 / 78% of the copy bandwidth (24576 x 6144, two experts' gate, two
// experts' down) to 88 / 83 / 84%, Q6_K's from 49 / 45 / 42% to 58 / 54 / 54% and Q4_0's
// from 70 / 66 / 60% to 73 / 62 / 64%; Q4_K's stayed at 66 / 59-61 / 58% (126 registers
// against 76-80), and bf16's down shape fell from 99 to 88%.
template <class F>
struct Pipelined {
    static constexpr bool on = (PIPELINE & 16) != 0;  // the float types
};
#define PIPELINED(F, bit) \
    template <>           \
    struct Pipelined<F> { static constexpr bool on = (PIPELINE & bit) != 0; };
PIPELINED(Q8_0, 1)
PIPELINED(Q6_K, 2)
PIPELINED(Q4_0, 4)
PIPELINED(Q4_K, 8)

// The types whose rows may be staged in shared memory (rows of row_bytes(cols) contiguous
// bytes, 16-byte multiples): Q4_K. Its products wait on their loads' latency (24 warps per
// multiprocessor at 76-80 registers, ~90 instructions per 32 bytes of weights, and ptxas
// spreads a step's loads over several waves); a warp's two rows copied by cp.async are
// all in flight at once without holding registers.
template <class F>
struct Staged {
    static constexpr bool on = false;
    __device__ static size_t row_bytes(int cols) { return 0; }
};
template <>
struct Staged<Q4_K> {
    static constexpr bool on = STAGE;
    __device__ static size_t row_bytes(int cols) { return (size_t)(cols >> 8) * 144; }
};

__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// Copies rows r0..r0+nr of in's matrix into this warp's part of the block's dynamic shared
// memory (W x R rows) and points `in` at them (row r0 becomes row 0). False, with `in`
// untouched, when the launch gave less room than that.
template <class Input, int R, int W>
__device__ bool stage_rows(Input& in, int r0, int nr, int lane) {
    typedef Staged<typename Input::Format> S;
    size_t rb = S::row_bytes(in.cols);
    if ((size_t)W * R * rb > dynamic_smem_bytes()) return false;
    extern __shared__ __align__(16) u8 stage[];
    u8* mine = stage + (size_t)(threadIdx.x >> 5) * R * rb;
    const u8* g = in.w + (size_t)r0 * rb;
    int n16 = (int)(((size_t)nr * rb) >> 4);
    for (int i = lane; i < n16; i += 32) cp_async16(mine + 16 * i, g + 16 * i, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    in.w = mine;
    in.rows = nr;
    return true;
}

// The loop shared by both activation kinds, over a warp's rows r0..r0+R (those below
// `rows`) into acc; `in` holds row r0 as its row rw. Input::load(u) gives the unit's
// inputs, Input::load_w(r, u) one row's weights of it, Input::dotw their product
// (Input::dot both).
template <class Input, int R>
__device__ __forceinline__ void rows_dot(const Input& in, int rw, int r0, int rows, int lane, int n_units, float (&acc)[R]) {
    if (Pipelined<typename Input::Format>::on && r0 + R <= rows) {
        matvec_pipelined<Input, R>(in, rw, lane, n_units, acc);
    } else if (r0 + R <= rows) {
#pragma unroll UNROLL
        for (int u = lane; u < n_units; u += 32) {
            typename Input::T x;
            in.load(u, x);
#pragma unroll
            for (int i = 0; i < R; i++) acc[i] += in.dot(rw + i, u, x);
        }
    } else {
        for (int u = lane; u < n_units; u += 32) {
            typename Input::T x;
            in.load(u, x);
            for (int i = 0; i < R && r0 + i < rows; i++) acc[i] += in.dot(rw + i, u, x);
        }
    }
}

template <class Input>
__device__ void matvec_rows(const Input& in, int rows, int n_units, float* y_row) {
    constexpr int R = Shape<typename Input::Format>::R, W = Shape<typename Input::Format>::W;
    int lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * W + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    // Staged: the same loop over the copy in shared memory (its own instance, so that each
    // instance's loads know their memory).
    bool staged = false;
    if constexpr (Staged<typename Input::Format>::on) {
        Input s = in;
        if (stage_rows<Input, R, W>(s, r0, min(R, rows - r0), lane)) {
            rows_dot<Input, R>(s, 0, r0, rows, lane, n_units, acc);
            staged = true;
        }
    }
    if (!staged) rows_dot<Input, R>(in, r0, r0, rows, lane, n_units, acc);
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = warp_sum(acc[i]);
    if (lane == 0)
        for (int i = 0; i < R && r0 + i < rows; i++) y_row[r0 + i] = acc[i];
}

template <class F>
struct QuantInput {
    typedef F Format;
    typedef typename F::XQ T;
    typedef typename F::WQ W;
    const u8* w;
    int rows, cols;
    const i8* xq;
    const float* xd;
    __device__ void load(int u, T& x) const { F::load_xq(xq, xd, u, x); }
    __device__ void load_w(int r, int u, W& q) const { F::load_w(w, rows, cols, r, u, q); }
    __device__ float dotw(const W& q, int u, const T& x) const { return F::dotw(q, u, x); }
    __device__ float dot(int r, int u, const T& x) const { return dotq<F>(w, rows, cols, r, u, x); }
};

template <class F>
struct FloatInput {
    typedef F Format;
    typedef typename F::X T;
    typedef typename F::WX W;
    const u8* w;
    int rows, cols;
    const float* x;
    __device__ void load(int u, T& v) const { F::load_x(x, u, v); }
    __device__ void load_w(int r, int u, W& q) const { F::load_w(w, rows, cols, r, u, q); }
    __device__ float dotw(const W& q, int u, const T& v) const { return F::dotw(q, u, v); }
    __device__ float dot(int r, int u, const T& v) const { return ::dot<F>(w, rows, cols, r, u, v); }
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
