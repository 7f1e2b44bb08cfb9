// A decode step's exchange with a host worker through mapped (page-locked, device-visible)
// host memory, inside a CUDA graph (host_call.rs): host_post hands over the layer's input
// row and the router's choices and raises the posted count; the GPU goes on with its own
// work; host_wait spins until the worker has answered that post, then copies the answer
// into device memory. words (host): [0, k) choices, k posted, k + 1 answered, k + 2 the
// post that timed out.

__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// x (d values) and ids (k) to the host, then posted = ++seq[0]. Several blocks write x (one
// block's stores over PCIe took 8 us for a 6,144-wide row); the last block to finish,
// counted in seq[3], raises the count.
extern "C" __global__ void host_post(const float* x, const int* ids, int d, int k, unsigned* seq,
                                     unsigned long long x_host, unsigned long long words_host) { PDL_ENTRY();
    float* hx = (float*)x_host;
    volatile unsigned* hw = (volatile unsigned*)words_host;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) hx[i] = x[i];
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < k; i += blockDim.x) hw[i] = (unsigned)ids[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        // this block's values reach host memory before it counts itself done
        __threadfence_system();
        unsigned done = atomicAdd(&seq[3], 1u);
        if (done == gridDim.x - 1) {
            // the last block: every block's values are out; announce them
            __threadfence_system();
            seq[3] = 0;
            unsigned s = seq[0] + 1;
            seq[0] = s;
            hw[k] = s;
        }
    }
}

// waits for answered == seq[0] (up to timeout_ns), then out = the host's n values; on a
// timeout, NaN and the post's number in words[k + 2]. Only block 0 polls the host's word;
// it tells the other blocks through seq[1] (the post it is done waiting for) and seq[2] (1:
// answered), so that one poller, not one per block, crosses PCIe.
extern "C" __global__ void host_wait(unsigned* seq, unsigned long long words_host, int k,
                                     unsigned long long out_host, int n, unsigned long long timeout_ns, float* out) { PDL_ENTRY();
    __shared__ int answered;
    volatile unsigned* hw = (volatile unsigned*)words_host;
    volatile unsigned* vs = (volatile unsigned*)seq;
    if (threadIdx.x == 0) {
        unsigned s = vs[0];
        if (blockIdx.x == 0) {
            unsigned long long t0 = now_ns();
            int ok = 1;
            while (hw[k + 1] != s) {
                if (now_ns() - t0 > timeout_ns) {
                    ok = 0;
                    hw[k + 2] = s;
                    break;
                }
                __nanosleep(100);
            }
            // the answer's values are read after its count
            __threadfence_system();
            vs[2] = ok;
            __threadfence();
            vs[1] = s;
            answered = ok;
        } else {
            while (vs[1] != s) __nanosleep(100);
            __threadfence_system();
            answered = vs[2];
        }
    }
    __syncthreads();
    const volatile float* h = (const volatile float*)out_host;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = answered ? h[i] : __int_as_float(0x7fc00000);
}
