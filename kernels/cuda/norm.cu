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
// of one stage, the norm of the next and its products' input.
#define NORM_REG 2  // float4s per thread that rmsnorm_fused keeps in registers (decode: 1024 threads, rows up to 8192)

// rmsnorm_fused for a row of at most NORM_REG float4s per thread (width % 4 == 0): thread t
// holds float4s t, t + blockDim.x, ... from the first read to the last write (the loop
// order below is the general path's, so the sums are the same), and the int8 form is made
// from those registers: the 8 consecutive lanes holding a 32-value block take its maximum by
// shuffles, with quantize_block32's arithmetic, instead of reading the row back.
//
// The norm's weights do not depend on the kernel ahead, so they are read before the PDL
// wait (the caller's), and the gate is read with the row, ahead of the block's reduction:
// a single-block kernel on the decode path otherwise pays each of those L2 round trips in
// turn.
__device__ void norm_row_regs(float* row, const float* a, const float* cw, int k, float alpha, float beta, const float4* wv,
                              const float* gr, int width, float eps, i8* q, float* d) {
    __shared__ float scratch[32];
    float4* r4 = (float4*)row;
    const float4* a4 = a ? (const float4*)(a + (size_t)blockIdx.x * width) : nullptr;
    const float4* g4 = (const float4*)gr;
    int n4 = width >> 2;
    float4 v[NORM_REG], gv[NORM_REG];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i >= n4) continue;
        v[j] = r4[i];
        if (g4) gv[j] = g4[i];
        if (a4) {
            float4 u = cw ? combine4_at(a, cw, k, width, blockIdx.x, i << 2) : a4[i];
            v[j] = mix4(v[j], alpha, u, beta);
        }
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)width + eps);
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i >= n4) continue;
        float4 g = wv[j];
        float4 y = make_float4(v[j].x * r * g.x, v[j].y * r * g.y, v[j].z * r * g.z, v[j].w * r * g.w);
        if (g4) {
            float4 t = gv[j];
            y = make_float4(y.x * sigmoid(t.x), y.y * sigmoid(t.y), y.z * sigmoid(t.z), y.w * sigmoid(t.w));
        }
        r4[i] = y;
        v[j] = y;
    }
    if (!q) return;
    // width % 32 == 0, so each aligned group of 8 lanes holds whole blocks or nothing; every
    // lane takes part in the shuffles
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (j * blockDim.x >= n4) break;  // the same for the whole block
        bool live = i < n4;
        float m = live ? fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))) : 0.f;
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        if (!live) continue;
        float dd = m / 127.f;
        float id = dd != 0.f ? 1.f / dd : 0.f;
        u32 c = (u32)(u8)(i8)roundf(v[j].x * id) | (u32)(u8)(i8)roundf(v[j].y * id) << 8 | (u32)(u8)(i8)roundf(v[j].z * id) << 16 |
                (u32)(u8)(i8)roundf(v[j].w * id) << 24;
        ((u32*)(q + (size_t)blockIdx.x * width))[i] = c;
        if ((i & 7) == 0) {
            u16 h;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(dd));
            d[(size_t)blockIdx.x * (width >> 5) + (i >> 3)] = f16_to_f32(h);
        }
    }
}

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
        norm_row_regs(x + (size_t)blockIdx.x * width, a, cw, k, alpha, beta, wv, gate ? gate + (size_t)blockIdx.x * width : nullptr, width,
                      eps, xq, xd);
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
