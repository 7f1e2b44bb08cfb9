// RMSNorm (prepended: common.cuh): x[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w,
// in place, one block per row; the mean of squares is accumulated in f32 per thread and
// reduced across the block. Rows of a multiple of 4 values go 16 bytes a load, so that a
// decode row (one block) takes one or two loads per thread rather than a long serial loop.

extern "C" __global__ void rmsnorm(float* x, const float* w, int width, float eps) {
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
