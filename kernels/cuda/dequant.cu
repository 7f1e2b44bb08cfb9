// Format conversions (prepended: common.cuh, formats.cuh): whole matrices to bf16 for the
// tensor-core products of prefill, gathered rows to f32 (the token embedding lookup),
// f32 activations to bf16, and f32 activations to int8 blocks for the matrix-vector
// products of quantized weights.

// out[r, :] = W[r, :] as bf16, 8 values per thread (cols % 8 == 0): a warp writes 512
// consecutive bytes.
template <class F>
__device__ void to_bf16(const u8* w, int rows, int cols, u16* out) {
    long long per_row = cols >> 3;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_row * rows) return;
    int r = (int)(i / per_row), c = (int)(i % per_row) * 8;
    float v[8];
    F::decode8(w, rows, cols, r, c, v);
    store8(out + (size_t)r * cols + c, v);
}

// out[t, :] (f32) = W[ids[t], :] for t = blockIdx.y (W has `rows` rows), cols % 8 == 0.
template <class F>
__device__ void gather_rows(const u8* w, int rows, int cols, const int* ids, float* out) {
    int t = blockIdx.y;
    for (int c = (blockIdx.x * blockDim.x + threadIdx.x) * 8; c < cols; c += gridDim.x * blockDim.x * 8) {
        float v[8];
        F::decode8(w, rows, cols, ids[t], c, v);
        store8(out + (size_t)t * cols + c, v);
    }
}

// The same for float matrices with rows that are not a multiple of 8: one value a thread.
template <class F>
__device__ void to_bf16_scalar(const u8* w, int rows, int cols, u16* out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    store1(out + i, F::value(w, cols, (int)(i / cols), (int)(i % cols)));
}

template <class F>
__device__ void gather_rows_scalar(const u8* w, int rows, int cols, const int* ids, float* out) {
    int t = blockIdx.y;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) out[(size_t)t * cols + c] = F::value(w, cols, ids[t], c);
}

#define DEQUANT(suffix, F)                                                                                                  \
    extern "C" __global__ void to_bf16_##suffix(const u8* w, int rows, int cols, u16* out) { PDL_ENTRY(); to_bf16<F>(w, rows, cols, out); } \
    extern "C" __global__ void gather_rows_##suffix(const u8* w, int rows, int cols, const int* ids, float* out) { PDL_ENTRY();           \
        gather_rows<F>(w, rows, cols, ids, out);                                                                           \
    }

DEQUANT(q8_0, Q8_0)
DEQUANT(q4_k, Q4_K)
DEQUANT(q6_k, Q6_K)
DEQUANT(q4_0, Q4_0)
DEQUANT(bf16, Half<true>)
DEQUANT(f16, Half<false>)
DEQUANT(f32, F32)

#define DEQUANT_SCALAR(suffix, F)                                                                                                  \
    extern "C" __global__ void to_bf16_scalar_##suffix(const u8* w, int rows, int cols, u16* out) { PDL_ENTRY(); to_bf16_scalar<F>(w, rows, cols, out); } \
    extern "C" __global__ void gather_rows_scalar_##suffix(const u8* w, int rows, int cols, const int* ids, float* out) { PDL_ENTRY();         \
        gather_rows_scalar<F>(w, rows, cols, ids, out);                                                                          \
    }

DEQUANT_SCALAR(bf16, Half<true>)
DEQUANT_SCALAR(f16, Half<false>)
DEQUANT_SCALAR(f32, F32)

extern "C" __global__ void f32_to_bf16_n(const float* x, long long n, u16* out) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}

// x [n, cols] (cols % 32 == 0) -> int8 values and one scale per 32-block, as ggml's
// quantize_row_q8_0: d = max|x| / 127, q = roundf(x / d) computed with the f32 inverse of
// d, and d kept rounded to f16 (stored here as the f32 value of that f16). One warp per
// block.
extern "C" __global__ void quantize_act(const float* x, long long n_blocks, i8* xq, float* xd) { PDL_ENTRY();
    long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;
    quantize_block32(x[blk * 32 + lane], lane, xq + blk * 32, xd + blk);
}

// quantize_act of SwiGLU's output silu(g) * u, computed as elementwise.cu's swiglu computes
// it: the input of an expert's down product in one pass instead of two.
extern "C" __global__ void swiglu_quantize(const float* g, const float* u, long long n_blocks, i8* xq, float* xd) { PDL_ENTRY();
    long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;
    long long i = blk * 32 + lane;
    quantize_block32(silu(g[i]) * u[i], lane, xq + blk * 32, xd + blk);
}
