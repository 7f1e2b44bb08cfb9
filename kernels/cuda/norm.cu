// RMSNorm (prepended: common.cuh): x[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w,
// in place, one block per row; the mean of squares is accumulated in f32 per thread and
// reduced across the block. Rows of a multiple of 4 values go 16 bytes a load, so that a
// decode row (one block) takes one or two loads per thread rather than a long serial loop.

extern "C" __global__ void rmsnorm(float* x, const float* w, int width, float eps) { PDL_ENTRY();
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * width;
    float ss = 0.f;
    if ((width & 3) == 0) {
        float4* r4 = (float4*)row;
        const float4* w4 = (const float4*)w;
        int n4 = width >> 2;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = r4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = block_sum(ss, scratch);
        float r = rsqrtf(ss / (float)width + eps);
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = r4[i], g = w4[i];
            r4[i] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        }
        return;
    }
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = row[i] * r * w[i];
}

// The fused norm: x[r, :] = rmsnorm(alpha * x[r, :] + beta * a[r, :]) * w in place
// (a == nullptr: rmsnorm(x[r, :]) * w, as rmsnorm above; cw != nullptr: a holds k rows per
// row of x, the MoE's expert outputs, and a[r, :] stands for their sum weighted by cw[r, :],
// as moe_combine computes it), then times sigmoid(gate[r, :])
// when gate != nullptr (the lightning output's gate), and with xq != nullptr the int8 blocks
// of the result as quantize_act makes them (width % 32 == 0). One kernel for the residual
// of one stage, the norm of the next and its products' input. Rows of at most NORM_REG
// float4s per thread (decode) stay in registers (rownorm.cuh).
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_fused(float* x, const float* a, const float* cw, int k, float alpha, float beta, const float* w,
                                         const float* gate, int width, float eps, i8* xq, float* xd) {
    if ((width & 3) == 0 && (width >> 2) <= NORM_REG * (int)blockDim.x) {
        float4 wv[NORM_REG];
#pragma unroll
        for (int j = 0; j < NORM_REG; j++) {
            int i = threadIdx.x + j * blockDim.x;
            if (i < (width >> 2)) wv[j] = ((const float4*)w)[i];
        }
        PDL_ENTRY();
        float* row = x + (size_t)blockIdx.x * width;
        float4 ys[NORM_REG];
        norm_row_regs(row, blockIdx.x, a, cw, k, alpha, beta, wv, gate ? gate + (size_t)blockIdx.x * width : nullptr, width, eps, row, 0,
                      width >> 2, xq, xd, ys);
        return;
    }
    PDL_ENTRY();
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * width;
    const float* ar = a ? a + (size_t)blockIdx.x * width : nullptr;
    const float* gr = gate ? gate + (size_t)blockIdx.x * width : nullptr;
    float ss = 0.f;
    if ((width & 3) == 0) {
        float4* r4 = (float4*)row;
        const float4* a4 = (const float4*)ar;
        const float4* w4 = (const float4*)w;
        const float4* g4 = (const float4*)gr;
        int n4 = width >> 2;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = r4[i];
            if (a4) {
                float4 u = cw ? combine4_at(a, cw, k, width, blockIdx.x, i << 2) : a4[i];
                v = mix4(v, alpha, u, beta);
            }
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            if (a4) r4[i] = v;
        }
        ss = block_sum(ss, scratch);
        float r = rsqrtf(ss / (float)width + eps);
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = r4[i], g = w4[i];
            float4 y = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
            if (g4) {
                float4 t = g4[i];
                y = make_float4(y.x * sigmoid(t.x), y.y * sigmoid(t.y), y.z * sigmoid(t.z), y.w * sigmoid(t.w));
            }
            r4[i] = y;
        }
    } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            float v = row[i];
            if (ar) v = mix(v, alpha, cw ? combine_at(a, cw, k, width, blockIdx.x, i) : ar[i], beta);
            row[i] = v;
            ss += v * v;
        }
        ss = block_sum(ss, scratch);
        float r = rsqrtf(ss / (float)width + eps);
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            float y = row[i] * r * w[i];
            if (gr) y *= sigmoid(gr[i]);
            row[i] = y;
        }
    }
    if (!xq) return;
    __syncthreads();  // the row's normalised values, written by the whole block
    int lane = threadIdx.x & 31, nb = width >> 5;
    size_t first = (size_t)blockIdx.x * nb;
    for (int b = threadIdx.x >> 5; b < nb; b += blockDim.x >> 5)
        quantize_block32(row[b * 32 + lane], lane, xq + (first + b) * 32, xd + first + b);
}
