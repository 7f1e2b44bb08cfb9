// RMSNorm (prepended: common.cuh): x[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w,
// in place, one block per row; the mean of squares is accumulated in f32 per thread and
// reduced across the block.

extern "C" __global__ void rmsnorm(float* x, const float* w, int width, float eps) {
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] = row[i] * r * w[i];
}
