// Dequantization (prepended: common.cuh, formats.cuh): whole matrices to bf16 for the
// tensor-core products of prefill, gathered rows to f32 (the token embedding lookup),
// and f32 activations to bf16.

// out[r, :] (bf16) = W[r, :], one thread per unit.
template <class F>
__device__ void to_bf16(const u8* w, int rows, int cols, u16* out) {
    long long n_units = F::units(cols);
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_units * rows) return;
    int r = (int)(i / n_units), u = (int)(i % n_units);
    F::decode(w, rows, cols, r, u, out + (size_t)r * cols);
}

// out[t, :] (f32) = W[ids[t], :] for t = blockIdx.y (W has `rows` rows).
template <class F>
__device__ void gather_rows(const u8* w, int rows, int cols, const int* ids, float* out) {
    int t = blockIdx.y;
    int n_units = F::units(cols);
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < n_units; u += gridDim.x * blockDim.x)
        F::decode(w, rows, cols, ids[t], u, out + (size_t)t * cols);
}

#define DEQUANT(suffix, F)                                                                                                  \
    extern "C" __global__ void to_bf16_##suffix(const u8* w, int rows, int cols, u16* out) { to_bf16<F>(w, rows, cols, out); } \
    extern "C" __global__ void gather_rows_##suffix(const u8* w, int rows, int cols, const int* ids, float* out) {           \
        gather_rows<F>(w, rows, cols, ids, out);                                                                           \
    }

DEQUANT(q8_0, Q8_0)
DEQUANT(q4_k, Q4_K)
DEQUANT(q6_k, Q6_K)
DEQUANT(q4_0, Q4_0)
DEQUANT(bf16, Half<true>)
DEQUANT(f16, Half<false>)
DEQUANT(f32, F32)

extern "C" __global__ void f32_to_bf16_n(const float* x, long long n, u16* out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}
