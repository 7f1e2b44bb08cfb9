// Elementwise and row-moving ops of the forward pass (prepended: common.cuh).

extern "C" __global__ void silu_inplace(float* x, long long n) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = silu(x[i]);
}

// o *= sigmoid(g)
extern "C" __global__ void sigmoid_gate(float* o, const float* g, long long n) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) o[i] *= sigmoid(g[i]);
}

// out = silu(g) * u
extern "C" __global__ void swiglu(const float* g, const float* u, float* out, long long n) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = silu(g[i]) * u[i];
}

// out = bf16(silu(g) * u): swiglu straight into a tensor-core product's input
extern "C" __global__ void swiglu_bf16(const float* g, const float* u, u16* out, long long n) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(silu(g[i]) * u[i]);
}

// x = alpha * x + beta * a
extern "C" __global__ void residual(float* x, const float* a, long long n, float alpha, float beta) { PDL_ENTRY();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = mix(x[i], alpha, a[i], beta);
}

// dst[i, :] = src[idx[i] / div, :] for i = blockIdx.y
extern "C" __global__ void gather_rows(const float* src, const int* idx, int div, int width, float* dst) { PDL_ENTRY();
    const float* s = src + (size_t)(idx[blockIdx.y] / div) * width;
    float* d = dst + (size_t)blockIdx.y * width;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) d[c] = s[c];
}

// dst[i, :] = bf16(src[idx[i] / div, :]) for i = blockIdx.y: gathered straight into a
// tensor-core product's input
extern "C" __global__ void gather_rows_bf16(const float* src, const int* idx, int div, int width, u16* dst) { PDL_ENTRY();
    const float* s = src + (size_t)(idx[blockIdx.y] / div) * width;
    u16* d = dst + (size_t)blockIdx.y * width;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) d[c] = f32_to_bf16(s[c]);
}

// out[i] = table[ids[i]] for i < n (an expert's place in a layer's GPU stacks); ids come
// from the router, below the table's length by construction
extern "C" __global__ void map_ids(const int* ids, const int* table, int n, int* out) { PDL_ENTRY();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = table[ids[i]];
}

// hot[j] and cold_at[j] for one token's k choices ids when some experts stay in host memory
// (cold[e] != 0) and every expert has its place at its own index (--cold-experts mixed):
// hot[j] = ids[j] for a resident expert and -1 for a cold one, cold_at[j] the other way
// round. One launch of the products computes the resident choices whole, another the cold
// choices' GPU share of their hidden units (the products skip -1), and the host worker
// the rest of the cold ones.
extern "C" __global__ void split_places(const int* ids, const int* cold, int k, int* hot, int* cold_at) { PDL_ENTRY();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    int e = ids[j];
    bool c = cold[e] != 0;
    hot[j] = c ? -1 : e;
    cold_at[j] = c ? e : -1;
}

// For each row r = blockIdx.y whose flag src[r] is not 0, y[r, :] = src[rows + r * width
// ...] (add = 0) or y[r, :] += it (add = 1): a host call's output (flags, then rows x width
// values) over the rows the host computed, whole or its part of them
extern "C" __global__ void take_flagged_rows(const float* src, int rows, int width, int add, float* y) { PDL_ENTRY();
    if (src[blockIdx.y] == 0.0f) return;
    const float* s = src + rows + (size_t)blockIdx.y * width;
    float* d = y + (size_t)blockIdx.y * width;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) d[c] = add ? d[c] + s[c] : s[c];
}

// dst[idx[i], :] = src[i, :] for i = blockIdx.y
extern "C" __global__ void scatter_rows(const float* src, const int* idx, int width, float* dst) { PDL_ENTRY();
    const float* s = src + (size_t)blockIdx.y * width;
    float* d = dst + (size_t)idx[blockIdx.y] * width;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) d[c] = s[c];
}

// The end of a captured graph when timing it (MXR_TIMELINE=1, Gpu::capture): a kernel
// that only stamps, so that the graph's last real kernel is charged until it completes.
extern "C" __global__ void timeline_mark() { PDL_ENTRY(); }
