// One row's fused RMSNorm held in registers (prepended after common.cuh to norm.cu, whose
// rmsnorm_fused runs it for decode rows, and to moe.cu, whose moe_norm_route runs it in
// every routing block).
#define NORM_REG 2  // float4s per thread held in registers (decode: 1024 threads, rows up to 8192)

// rmsnorm_fused's arithmetic for row t of at most NORM_REG float4s per thread (width % 4 ==
// 0): y = rmsnorm(alpha row + beta a[t]) * w (a[t] the combination of k expert outputs by
// cw when cw != nullptr), times sigmoid(gate) when gr != nullptr. Thread i holds float4s i,
// i + blockDim.x, ... from the first read to the last write (the loop order is the general
// path's, so the sums are the same) and leaves them in ys. Float4s [lo, hi) of y go to out
// (which may be row: each thread reads its values before it writes them), and with q their
// int8 blocks, made from the registers: the 8 consecutive lanes holding a 32-value block
// take its maximum by shuffles, with quantize_block32's arithmetic, instead of reading the
// row back. lo and hi are multiples of 8 (whole blocks).
//
// The norm's weights (wv) do not depend on the kernel ahead, so callers read them before
// the PDL wait, and the gate is read with the row, ahead of the block's reduction: a
// single-block kernel on the decode path otherwise pays each of those L2 round trips in
// turn.
__device__ void norm_row_regs(const float* row, int t, const float* a, const float* cw, int k, float alpha, float beta, const float4* wv,
                              const float* gr, int width, float eps, float* out, int lo, int hi, i8* q, float* d, float4 (&ys)[NORM_REG]) {
    __shared__ float scratch[32];
    const float4* r4 = (const float4*)row;
    float4* o4 = (float4*)out;
    const float4* a4 = a ? (const float4*)(a + (size_t)t * width) : nullptr;
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
            float4 u = cw ? combine4_at(a, cw, k, width, t, i << 2) : a4[i];
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
            float4 s = gv[j];
            y = make_float4(y.x * sigmoid(s.x), y.y * sigmoid(s.y), y.z * sigmoid(s.z), y.w * sigmoid(s.w));
        }
        if (i >= lo && i < hi) o4[i] = y;
        ys[j] = y;
    }
    if (!q) return;
    // width % 32 == 0, so each aligned group of 8 lanes holds whole blocks or nothing; every
    // lane takes part in the shuffles
#pragma unroll
    for (int j = 0; j < NORM_REG; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (j * blockDim.x >= n4) break;  // the same for the whole block
        bool live = i < n4;
        float4 y = ys[j];
        float m = live ? fmaxf(fmaxf(fabsf(y.x), fabsf(y.y)), fmaxf(fabsf(y.z), fabsf(y.w))) : 0.f;
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        if (!live || i < lo || i >= hi) continue;
        float dd = m / 127.f;
        float id = dd != 0.f ? 1.f / dd : 0.f;
        u32 c = (u32)(u8)(i8)roundf(y.x * id) | (u32)(u8)(i8)roundf(y.y * id) << 8 | (u32)(u8)(i8)roundf(y.z * id) << 16 |
                (u32)(u8)(i8)roundf(y.w * id) << 24;
        ((u32*)(q + (size_t)t * width))[i] = c;
        if ((i & 7) == 0) {
            u16 h;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(dd));
            d[(size_t)t * (width >> 5) + (i >> 3)] = f16_to_f32(h);
        }
    }
}
