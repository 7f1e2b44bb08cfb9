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
// unit's loads issued before the current unit's products; `Pipelined`), or Q8_0's and
// Q4_K's products run from shared memory filled by cp.async (`Staged`).

// A launch may compute part of each matrix (a cold expert's share of its hidden units that
// the GPU reads in place while the CPU computes the rest; offload_graph.rs): rows 0..n_rows
// and columns 0..n_cols of the `rows` x `cols` layout. The activation rows are n_cols wide
// and the output rows n_rows; the whole matrix is n_rows = rows, n_cols = cols.
//
// A pair whose expert id is negative is skipped: its output rows are left as they are
// (a decode step's cold choice that the CPU computes, whose rows are replaced afterwards;
// offload_graph.rs). Read after the kernel's PDL wait, like every id.
#define SKIP_PAIR(ids, p) ((ids) && (ids)[p] < 0)

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
// MXR_MATVEC_STAGE: S > 0 (default 2) runs a `Staged` type's products from shared memory,
// through a ring of S chunks per warp filled by cp.async, when the launcher gives the
// block room; 0 never
#ifndef STAGE
#define STAGE 2
#endif
// MXR_MATVEC_STAGED: the types staged when STAGE > 0, PIPELINE's bits (1 Q8_0, 8 Q4_K;
// default Q4_K)
#ifndef STAGED
#define STAGED 8
#endif
// MXR_MATVEC_EARLY: 1 lets a dense staged launch issue its first chunks before its PDL
// wait; 0 (default) waits first
#ifndef EARLY
#define EARLY 0
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

// The loop shared by both activation kinds, over a warp's rows r0..r0+R (those below
// `rows`) into acc. Input::load(u) gives the unit's inputs, Input::load_w(r, u) one row's
// weights of it, Input::dotw their product (Input::dot both).
template <class Input, int R>
__device__ __forceinline__ void rows_dot(const Input& in, int r0, int rows, int lane, int n_units, float (&acc)[R]) {
    if (Pipelined<typename Input::Format>::on && r0 + R <= rows) {
        matvec_pipelined<Input, R>(in, r0, lane, n_units, acc);
    } else if (r0 + R <= rows) {
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
}

// bx: the block of rows (W warps' R rows each) this block computes now.
template <class Input>
__device__ void matvec_rows(const Input& in, int rows, int n_units, float* y_row, int bx) {
    constexpr int R = Shape<typename Input::Format>::R, W = Shape<typename Input::Format>::W;
    int lane = threadIdx.x & 31;
    int r0 = (bx * W + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    rows_dot<Input, R>(in, r0, rows, lane, n_units, acc);
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

// Products from shared memory (MXR_MATVEC_STAGE = S > 0, for the types in STAGED): the
// block copies its activation row into shared memory once, and each warp keeps a ring of
// S chunks of its R rows (32 units each, one step of its lanes) filled by cp.async: S - 1
// chunks are in flight while the warp computes one, and bytes in flight hold no registers.
// Q4_K's direct products waited on their loads' latency (24 warps per multiprocessor at
// 76-80 registers, and ptxas spreads a step's loads over several waves). A dense launch (no
// expert ids) issues its first chunks before it waits for the previous kernel (PDL), since
// weights never depend on it: a kernel's blocks that become resident while a small kernel
// runs fetch their weights meanwhile (EARLY; off by default: slower end to end on an H200).
//
// Each staged type: CHUNK_COLS (32 units' values), CHUNK_ROW_BYTES (a row's bytes of them
// as the chunk holds them: the chunk of R rows is the type's layout of an R x CHUNK_COLS
// matrix), fits(cols), x_bytes(cols), copy_chunk<R>, copy_x and load_x (the activation
// row, 16-byte pieces swizzled so that a quarter warp's lanes read distinct banks), and
// finish_x (what the block derives from the row once it is in, when FINISH).
template <class F>
struct Staged {
    static constexpr bool on = false;
};

// The 16-byte pieces of the activation scales (f32, one per 32 values) after the values.
__device__ __forceinline__ void copy_x_scales(const float* xd, int cols, u8* dst, int tid, int threads) {
    for (int i = tid; i < cols / 128; i += threads) cp_async16(dst + cols + 16 * i, (const u8*)xd + 16 * i, true);
}

template <>
struct Staged<Q4_K> {
    static constexpr bool on = STAGE > 0 && (STAGED & 8);
    static constexpr int CHUNK_COLS = 2048;       // 32 units of 64 values: 8 blocks
    static constexpr int CHUNK_ROW_BYTES = 1152;  // their 8 x 144 bytes
    // each unit's two activation block sums (int2) after the scales, made by finish_x
    // once the row is in: summed once per block rather than once per warp and step
    static constexpr bool FINISH = true;
    __device__ static bool fits(int cols) { return (cols & 255) == 0; }
    __device__ static int x_bytes(int cols) { return cols + cols / 4; }  // values, scales, sums
    // Chunk k (units 32k..) of rows r0..r0+R into dst: the first nr rows from w, the
    // others zeros. A lane copies pieces lane, lane + 32 and lane + 64 (< 72) of each row;
    // pieces past the row's last unit are zero-filled without a read.
    template <int R>
    __device__ static void copy_chunk(const u8* w, int rows, int cols, int r0, int nr, int k, int n_units, u8* dst, int lane) {
        size_t rb = (size_t)(cols >> 8) * 144;
        int n16 = min(32, n_units - (k << 5)) / 4 * 9;  // 9 pieces of 16 bytes per block
        const u8* g = w + (size_t)r0 * rb + (size_t)k * CHUNK_ROW_BYTES + 16 * lane;
        // the destination as a 32-bit shared address (no generic-window arithmetic)
        u32 d = (u32)__cvta_generic_to_shared(dst) + 16 * lane;
#pragma unroll
        for (int i = 0; i < R; i++) {
            const u8* gi = i < nr ? g + i * rb : g;
#pragma unroll
            for (int q = 0; q < 3; q++)
                if (q < 2 || lane < 8) cp_async16_s(d + i * CHUNK_ROW_BYTES + 512 * q, gi + 512 * q, i < nr && lane + 32 * q < n16);
        }
    }
    // unit u's 64 inputs: four pieces, piece m stored at m ^ ((u >> 1) & 3)
    __device__ static void load_x_values(const u8* xs, int u, Q4_K::XQ& x) {
        const u8* p = xs + 64 * u;
        int sw = (u >> 1) & 3;
        int4 a0 = *(const int4*)(p + 16 * (0 ^ sw)), a1 = *(const int4*)(p + 16 * (1 ^ sw));
        int4 b0 = *(const int4*)(p + 16 * (2 ^ sw)), b1 = *(const int4*)(p + 16 * (3 ^ sw));
        x.l[0] = a0.x; x.l[1] = a0.y; x.l[2] = a0.z; x.l[3] = a0.w;
        x.l[4] = a1.x; x.l[5] = a1.y; x.l[6] = a1.z; x.l[7] = a1.w;
        x.h[0] = b0.x; x.h[1] = b0.y; x.h[2] = b0.z; x.h[3] = b0.w;
        x.h[4] = b1.x; x.h[5] = b1.y; x.h[6] = b1.z; x.h[7] = b1.w;
    }
    __device__ static void copy_x(const i8* xq, const float* xd, int cols, u8* dst, int tid, int threads) {
        for (int i = tid; i < cols / 16; i += threads) {
            int u = i >> 2, m = i & 3;
            cp_async16(dst + 64 * u + 16 * (m ^ ((u >> 1) & 3)), xq + 16 * i, true);
        }
        copy_x_scales(xd, cols, dst, tid, threads);
    }
    __device__ static void load_x(const u8* xs, int cols, int u, Q4_K::XQ& x) {
        load_x_values(xs, u, x);
        float2 d = *(const float2*)(xs + cols + 8 * u);  // unit u's blocks are 2u, 2u + 1
        x.dl = d.x;
        x.dh = d.y;
        int2 sums = *(const int2*)(xs + cols + cols / 8 + 8 * u);
        x.sl = sums.x;
        x.sh = sums.y;
    }
    // the block sums of every unit, from the staged row (the same integers Q4_K::sums makes)
    __device__ static void finish_x(u8* xs, int cols, int tid, int threads) {
        for (int u = tid; u < cols / 64; u += threads) {
            Q4_K::XQ x;
            load_x_values(xs, u, x);
            Q4_K::sums(x);
            *(int2*)(xs + cols + cols / 8 + 8 * u) = make_int2(x.sl, x.sh);
        }
    }
};

template <>
struct Staged<Q8_0> {
    static constexpr bool on = STAGE > 0 && (STAGED & 1);
    static constexpr int CHUNK_COLS = 1024;       // 32 units of 32 values
    static constexpr int CHUNK_ROW_BYTES = 1088;  // 1024 int8 values and 32 f16 scales
    static constexpr bool FINISH = false;
    __device__ static void finish_x(u8* xs, int cols, int tid, int threads) {}
    // whole 256-column groups: every row's values and scales, and a chunk's 32 or a
    // multiple of 8 scales, lie on 16-byte boundaries
    __device__ static bool fits(int cols) { return (cols & 255) == 0; }
    __device__ static int x_bytes(int cols) { return cols + cols / 8; }
    // the chunk holds R rows of values, then R rows of 32 scales; a lane copies value
    // pieces lane and lane + 32 of each row, lanes 0-3 its scales
    template <int R>
    __device__ static void copy_chunk(const u8* w, int rows, int cols, int r0, int nr, int k, int n_units, u8* dst, int lane) {
        int units = min(32, n_units - (k << 5));
        const u8* g = w + (size_t)r0 * cols + (k << 10) + 16 * lane;
        const u8* gs = w + (size_t)rows * cols + ((size_t)r0 * (cols >> 5) + (k << 5)) * 2 + 16 * lane;
#pragma unroll
        for (int i = 0; i < R; i++) {
            bool row = i < nr;
            const u8* gi = row ? g + (size_t)i * cols : g;
            cp_async16(dst + i * 1024 + 16 * lane, gi, row && lane < 2 * units);
            cp_async16(dst + i * 1024 + 16 * (lane + 32), gi + 512, row && lane + 32 < 2 * units);
            if (lane < 4) cp_async16(dst + R * 1024 + i * 64 + 16 * lane, row ? gs + (size_t)i * (cols >> 4) : gs, row && lane < units / 8);
        }
    }
    // unit u's 32 inputs: two pieces, piece m stored at m ^ ((u >> 2) & 1)
    __device__ static void copy_x(const i8* xq, const float* xd, int cols, u8* dst, int tid, int threads) {
        for (int i = tid; i < cols / 16; i += threads) {
            int u = i >> 1, m = i & 1;
            cp_async16(dst + 32 * u + 16 * (m ^ ((u >> 2) & 1)), xq + 16 * i, true);
        }
        copy_x_scales(xd, cols, dst, tid, threads);
    }
    __device__ static void load_x(const u8* xs, int cols, int u, XBlock& x) {
        const u8* p = xs + 32 * u;
        int sw = (u >> 2) & 1;
        int4 a = *(const int4*)(p + 16 * sw), b = *(const int4*)(p + 16 * (1 ^ sw));
        x.v[0] = a.x; x.v[1] = a.y; x.v[2] = a.z; x.v[3] = a.w;
        x.v[4] = b.x; x.v[5] = b.y; x.v[6] = b.z; x.v[7] = b.w;
        x.d = *(const float*)(xs + cols + 4 * u);
    }
};

__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// Whether this launch runs staged: on for the type, the launcher gave the block room for
// the activation row and W warps' rings, and every copy is 16-byte aligned (the same for
// every thread of the block, and known before the previous kernel ends).
template <class F>
__device__ bool stage_fits(const u8* w, long long expert_stride, int cols, int n_cols, const i8* xq, const float* xd) {
    typedef Staged<F> S;
    constexpr int R = Shape<F>::R, W = Shape<F>::W;
    if (!S::fits(cols) || !S::fits(n_cols) || (((size_t)w | (size_t)expert_stride | (size_t)xq | (size_t)xd) & 15)) return false;
    return (size_t)S::x_bytes(n_cols) + (size_t)W * STAGE * R * S::CHUNK_ROW_BYTES <= dynamic_smem_bytes();
}

// A block's rows from shared memory, when stage_fits (else false, having done nothing):
// rows of matrix w (expert ids[p] of a stack when ids; its part n_rows x n_cols) times the
// activation row xq, xd.
// This does the kernel's PDL wait. The lane's units and the order of its sums are those of
// the direct loop, so the results are the same bits.
template <class F>
__device__ bool matvec_staged(const u8* w, long long expert_stride, const int* ids, int p, int rows, int cols, int n_rows, int n_cols,
                              const i8* xq, const float* xd, float* y_row, int bx) {
    typedef Staged<F> S;
    constexpr int R = Shape<F>::R, W = Shape<F>::W, CB = R * S::CHUNK_ROW_BYTES;
    if (!stage_fits<F>(w, expert_stride, cols, n_cols, xq, xd)) return false;
    extern __shared__ __align__(16) u8 smem[];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r0 = (bx * W + warp) * R;
    int n_units = F::units(n_cols), nr = max(0, min(R, n_rows - r0)), steps = (n_units + 31) >> 5;
    u8* xs = smem;
    u8* ring = smem + S::x_bytes(n_cols) + (size_t)warp * STAGE * CB;
    bool early = EARLY && !ids;
    if (!early) {
        PDL_ENTRY();
        if (ids) {
            if (ids[p] < 0) return true;  // a pair another device computes (SKIP_PAIR)
            w += (long long)ids[p] * expert_stride;
        }
    }
#pragma unroll
    for (int s = 0; s < STAGE - 1; s++) {
        if (nr > 0 && s < steps) S::template copy_chunk<R>(w, rows, cols, r0, nr, s, n_units, ring + s * CB, lane);
        cp_async_commit();
    }
    if (early) PDL_ENTRY();
    S::copy_x(xq, xd, n_cols, xs, threadIdx.x, 32 * W);
    cp_async_commit();
    cp_async_wait<0>();  // this thread's copies
    __syncthreads();     // and everyone's
    if constexpr (S::FINISH) {
        S::finish_x(xs, n_cols, threadIdx.x, 32 * W);
        __syncthreads();
    }
    if (nr == 0) return true;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    int cur = 0, next = STAGE - 1;  // ring slots of chunks k and k + STAGE - 1
    for (int k = 0; k < steps; k++) {
        if (k + STAGE - 1 < steps) S::template copy_chunk<R>(w, rows, cols, r0, nr, k + STAGE - 1, n_units, ring + next * CB, lane);
        cp_async_commit();
        cp_async_wait<STAGE - 1>();
        __syncwarp();
        int u = (k << 5) + lane;
        if (u < n_units) {
            typename F::XQ x;
            S::load_x(xs, n_cols, u, x);
            const u8* c = ring + cur * CB;
            // the chunk as an R x CHUNK_COLS matrix; a chunk starts at a multiple of 32
            // units, so unit u is its unit `lane`, at the same place in its block
#pragma unroll
            for (int i = 0; i < R; i++) {
                typename F::WQ q;
                F::load_w(c, R, S::CHUNK_COLS, i, lane, q);
                acc[i] += F::dotw(q, lane, x);
            }
        }
        __syncwarp();  // the slot is refilled next step
        cur = cur + 1 == STAGE ? 0 : cur + 1;
        next = next + 1 == STAGE ? 0 : next + 1;
    }
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = warp_sum(acc[i]);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < R; i++)
            if (i < nr) y_row[r0 + i] = acc[i];
    }
    return true;
}

// Quantized products cover their n_bx blocks of rows with gridDim.x blocks, each taking
// every gridDim.x-th (a grid of n_bx: one each; fewer: products that read host memory over
// PCIe leave SMs to other work, `Gpu::over_pcie`). Pair p's input row (xqp, xdp) and
// output row (y_row).
template <class F>
__device__ void matvec_q_blocks(const u8* w, long long expert_stride, const int* ids, int p, int rows, int cols, int n_rows, int n_cols,
                                const i8* xqp, const float* xdp, float* y_row, int n_bx) {
    for (int bx = blockIdx.x; bx < n_bx; bx += gridDim.x) {
        if (bx != blockIdx.x) __syncthreads();  // every warp is done with the staged activations
        if constexpr (Staged<F>::on)
            if (matvec_staged<F>(w, expert_stride, ids, p, rows, cols, n_rows, n_cols, xqp, xdp, y_row, bx)) continue;
        PDL_ENTRY();
        if (SKIP_PAIR(ids, p)) return;
        QuantInput<F> in{w + (ids ? (long long)ids[p] * expert_stride : 0ll), rows, cols, xqp, xdp};
        matvec_rows(in, n_rows, F::units(n_cols), y_row, bx);
    }
}

template <class F>
__device__ void matvec_q(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const i8* xq, const float* xd, int x_div, float* y,
                         int n_rows, int n_cols, int n_bx) {
    int p = blockIdx.y;
    size_t xrow = (size_t)(p / x_div);
    matvec_q_blocks<F>(w, expert_stride, ids, p, rows, cols, n_rows, n_cols, xq + xrow * n_cols, xd + xrow * (n_cols >> 5), y + (size_t)p * n_rows,
                       n_bx);
}

template <class F>
__device__ void matvec_f(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y,
                         int n_rows, int n_cols) {
    int p = blockIdx.y;
    if (SKIP_PAIR(ids, p)) return;
    FloatInput<F> in{w + (ids ? (long long)ids[p] * expert_stride : 0ll), rows, cols, x + (size_t)(p / x_div) * n_cols};
    matvec_rows(in, n_rows, F::units(n_cols), y + (size_t)p * n_rows, blockIdx.x);
}

// Two quantized matrices of one type and width over the same int8 input in one launch
// (blockIdx.z picks the matrix): the MoE's gate and up products, the lightning layer's
// qkv and gate. Each has its own rows, expert stride and output, and computes its rows
// 0..n_rows (all its columns).
template <class F>
__device__ void matvec2_q(const u8* w0, const u8* w1, long long s0, long long s1, const int* ids, int rows0, int rows1, int cols, const i8* xq,
                          const float* xd, int x_div, float* y0, float* y1, int n_rows0, int n_rows1, int n_bx) {
    bool second = blockIdx.z != 0;
    const u8* w = second ? w1 : w0;
    long long s = second ? s1 : s0;
    int rows = second ? rows1 : rows0, n_rows = second ? n_rows1 : n_rows0, p = blockIdx.y;
    size_t xrow = (size_t)(p / x_div);
    matvec_q_blocks<F>(w, s, ids, p, rows, cols, n_rows, cols, xq + xrow * cols, xd + xrow * (cols >> 5), (second ? y1 : y0) + (size_t)p * n_rows,
                       n_bx);
}

// Float matrices whose rows are not a whole number of 16-byte loads: one value at a time,
// one row per warp.
template <class F>
__device__ void matvec_scalar(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y,
                              int n_rows, int n_cols) {
    int p = blockIdx.y;
    if (SKIP_PAIR(ids, p)) return;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    const float* xp = x + (size_t)(p / x_div) * n_cols;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * Shape<F>::W + (threadIdx.x >> 5);
    if (r >= n_rows) return;
    float acc = 0.f;
    for (int u = lane; u < n_cols; u += 32) acc += F::dot1(wp, cols, r, u, xp);
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)p * n_rows + r] = acc;
}

// Float matrices with few rows (the router): one block per (row, pair), the block's
// threads striding over the row's units.
template <class F>
__device__ void matvec_wide(const u8* w, long long expert_stride, const int* ids, int rows, int cols, const float* x, int x_div, float* y,
                            int n_rows, int n_cols) {
    __shared__ float scratch[32];
    int p = blockIdx.y, r = blockIdx.x;
    if (SKIP_PAIR(ids, p)) return;
    const u8* wp = w + (ids ? (long long)ids[p] * expert_stride : 0ll);
    float acc = block_row_part_dot<F>(wp, rows, cols, n_cols, x + (size_t)(p / x_div) * n_cols, r, scratch);
    if (threadIdx.x == 0) y[(size_t)p * n_rows + r] = acc;
}

#define QARGS \
    const u8 *w, long long expert_stride, const int *ids, int rows, int cols, const i8 *xq, const float *xd, int x_div, float *y, int n_rows, int n_cols, \
        int n_bx
#define FARGS \
    const u8 *w, long long expert_stride, const int *ids, int rows, int cols, const float *x, int x_div, float *y, int n_rows, int n_cols
#define MATVEC_Q(name, F, LB) \
    extern "C" __global__ void LB name(QARGS) { matvec_q<F>(w, expert_stride, ids, rows, cols, xq, xd, x_div, y, n_rows, n_cols, n_bx); }
#define MATVEC_F(name, F) \
    extern "C" __global__ void LB_ANY name(FARGS) { PDL_ENTRY(); matvec_f<F>(w, expert_stride, ids, rows, cols, x, x_div, y, n_rows, n_cols); }
#define MATVEC_SCALAR(name, F) \
    extern "C" __global__ void LB_ANY name(FARGS) { PDL_ENTRY(); matvec_scalar<F>(w, expert_stride, ids, rows, cols, x, x_div, y, n_rows, n_cols); }

#define Q2ARGS                                                                                                                  \
    const u8 *w0, const u8 *w1, long long s0, long long s1, const int *ids, int rows0, int rows1, int cols, const i8 *xq, const float *xd, \
        int x_div, float *y0, float *y1, int n_rows0, int n_rows1, int n_bx
#define MATVEC2_Q(name, F, LB)                                                                      \
    extern "C" __global__ void LB name(Q2ARGS) {                                                   \
        matvec2_q<F>(w0, w1, s0, s1, ids, rows0, rows1, cols, xq, xd, x_div, y0, y1, n_rows0, n_rows1, n_bx); \
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
    extern "C" __global__ void __launch_bounds__(256) name(FARGS) { PDL_ENTRY(); matvec_wide<F>(w, expert_stride, ids, rows, cols, x, x_div, y, n_rows, n_cols); }
MATVEC_WIDE(matvec_wide_bf16, Half<true>)
MATVEC_WIDE(matvec_wide_f16, Half<false>)
MATVEC_WIDE(matvec_wide_f32, F32)
MATVEC_SCALAR(matvec_bf16_scalar, Half<true>)
MATVEC_SCALAR(matvec_f16_scalar, Half<false>)
MATVEC_SCALAR(matvec_f32_scalar, F32)
