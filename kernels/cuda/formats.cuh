// Weight formats as the GPU holds them, one struct per type. A matrix of `rows` x `cols`
// starts at `w`; its rows split into `units` (16 or 32 values, one 16-byte load where the
// layout allows it). Each format gives:
//   units(cols)                        units per row
//   X, load_x(x, u, X&)                the inputs a unit multiplies (x: the whole f32 row),
//                                      loaded once and used for several rows
//   dot(w, rows, cols, r, u, X)        the unit's values of row r · those inputs
//   decode(w, rows, cols, r, u, out)   the unit's values into out[] (the whole output row)
// Layouts: ggml's blocks as in the GGUF file, except Q8_0, which is repacked at load time
// into int8 values [rows][cols] followed by f16 scales [rows][cols/32], so that values are
// 16-byte aligned.

__device__ __forceinline__ void store_val(float* out, int i, float v) { out[i] = v; }
__device__ __forceinline__ void store_val(u16* out, int i, float v) { out[i] = f32_to_bf16(v); }

// Byte k of w as a float, exactly, with two integer ops and one float add:
// 0x4B000000 | byte is the float 2^23 + byte.
__device__ __forceinline__ float byte_f(u32 w, int k) { return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + k)) - 8388608.f; }

// Σ_k (signed byte k of w) * x_k
__device__ __forceinline__ float dot_i8x4(u32 w, float4 x) {
    u32 b = w ^ 0x80808080u;  // two's complement -> offset 128
    return (byte_f(b, 0) - 128.f) * x.x + (byte_f(b, 1) - 128.f) * x.y + (byte_f(b, 2) - 128.f) * x.z + (byte_f(b, 3) - 128.f) * x.w;
}

// Σ_k (unsigned nibble-byte k of w) * x_k, for w with every byte < 16
__device__ __forceinline__ float dot_u8x4(u32 w, float4 x) { return byte_f(w, 0) * x.x + byte_f(w, 1) * x.y + byte_f(w, 2) * x.z + byte_f(w, 3) * x.w; }

__device__ __forceinline__ float sum4(float4 x) { return (x.x + x.y) + (x.z + x.w); }

struct Q8_0 {
    __device__ static int units(int cols) { return cols >> 4; }
    __device__ static float scale(const u8* w, int rows, int cols, int r, int u) {
        const u16* s = (const u16*)(w + (size_t)rows * cols);
        return f16_to_f32(s[(size_t)r * (cols >> 5) + (u >> 1)]);
    }
    struct X { float4 v[4]; };
    __device__ static void load_x(const float* x, int u, X& xu) {
        const float4* p = (const float4*)(x + (u << 4));
#pragma unroll
        for (int i = 0; i < 4; i++) xu.v[i] = p[i];
    }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        uint4 q = *(const uint4*)(w + (size_t)r * cols + (u << 4));
        float s = dot_i8x4(q.x, xu.v[0]) + dot_i8x4(q.y, xu.v[1]) + dot_i8x4(q.z, xu.v[2]) + dot_i8x4(q.w, xu.v[3]);
        return scale(w, rows, cols, r, u) * s;
    }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        const i8* q = (const i8*)(w + (size_t)r * cols + (u << 4));
        float d = scale(w, rows, cols, r, u);
        for (int i = 0; i < 16; i++) store_val(out, (u << 4) + i, (float)q[i] * d);
    }
};

// ggml block_q4_K, 144 bytes per 256 values: d, dmin (f16), 12 bytes of 6-bit scales and
// mins, 128 bytes of nibbles. A unit is 16 bytes of nibbles: 16 low nibbles (sub-block 2j)
// and 16 high nibbles (sub-block 2j+1), j = (u % 8) / 2.
struct Q4_K {
    __device__ static int units(int cols) { return cols >> 5; }
    __device__ static void scale_min(const u8* q, int j, float& sc, float& m) {
        if (j < 4) {
            sc = (float)(q[j] & 63);
            m = (float)(q[j + 4] & 63);
        } else {
            sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
            m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
        }
    }
    __device__ static const u8* block(const u8* w, int cols, int r, int u) { return w + (size_t)r * (cols >> 8) * 144 + (size_t)(u >> 3) * 144; }
    // The 16 low-nibble inputs, the 16 high-nibble inputs, and their sums (for the mins).
    struct X { float4 l[4], h[4]; float sl, sh; };
    __device__ static void load_x(const float* x, int u, X& xu) {
        int c = u & 7, j = c >> 1;
        const float4* xl = (const float4*)(x + (u >> 3) * 256 + j * 64 + (c & 1) * 16);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            xu.l[i] = xl[i];
            xu.h[i] = xl[i + 8];
        }
        xu.sl = sum4(xu.l[0]) + sum4(xu.l[1]) + sum4(xu.l[2]) + sum4(xu.l[3]);
        xu.sh = sum4(xu.h[0]) + sum4(xu.h[1]) + sum4(xu.h[2]) + sum4(xu.h[3]);
    }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        const u8* b = block(w, cols, r, u);
        int c = u & 7, j = c >> 1;
        uint4 q = *(const uint4*)(b + 16 + (c << 4));
        float d = f16_to_f32(*(const u16*)b), dmin = f16_to_f32(*(const u16*)(b + 2));
        float sc0, m0, sc1, m1;
        scale_min(b + 4, 2 * j, sc0, m0);
        scale_min(b + 4, 2 * j + 1, sc1, m1);
        const u32 M = 0x0F0F0F0Fu;
        float lo = dot_u8x4(q.x & M, xu.l[0]) + dot_u8x4(q.y & M, xu.l[1]) + dot_u8x4(q.z & M, xu.l[2]) + dot_u8x4(q.w & M, xu.l[3]);
        float hi = dot_u8x4((q.x >> 4) & M, xu.h[0]) + dot_u8x4((q.y >> 4) & M, xu.h[1]) + dot_u8x4((q.z >> 4) & M, xu.h[2]) +
                   dot_u8x4((q.w >> 4) & M, xu.h[3]);
        return d * (sc0 * lo + sc1 * hi) - dmin * (m0 * xu.sl + m1 * xu.sh);
    }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        const u8* b = block(w, cols, r, u);
        int c = u & 7, j = c >> 1;
        const u8* q = b + 16 + (c << 4);
        float d = f16_to_f32(load_u16(b)), dmin = f16_to_f32(load_u16(b + 2));
        float sc0, m0, sc1, m1;
        scale_min(b + 4, 2 * j, sc0, m0);
        scale_min(b + 4, 2 * j + 1, sc1, m1);
        float d0 = d * sc0, d1 = d * sc1, n0 = dmin * m0, n1 = dmin * m1;
        int base = (u >> 3) * 256 + j * 64 + (c & 1) * 16;
        for (int i = 0; i < 16; i++) {
            store_val(out, base + i, d0 * (float)(q[i] & 0xF) - n0);
            store_val(out, base + 32 + i, d1 * (float)(q[i] >> 4) - n1);
        }
    }
};

// ggml block_q6_K, 210 bytes per 256 values: ql[128], qh[64], int8 scales[16], d (f16).
// A unit is 16 values: half h, positions l0..l0+3 (l0 = 4g) of each of the four 32-wide
// quarters. Rows are not 4-byte aligned (210-byte blocks): loads are bytes.
struct Q6_K {
    __device__ static int units(int cols) { return cols >> 4; }
    __device__ static const u8* block(const u8* w, int cols, int r, int u) { return w + (size_t)r * (cols >> 8) * 210 + (size_t)(u >> 4) * 210; }
    template <class F>
    __device__ static void each(const u8* b, int u, F f) {
        int h = (u >> 3) & 1, l0 = (u & 7) * 4, is = l0 >> 4;
        const u8* ql = b + h * 64;
        const u8* qh = b + 128 + h * 32;
        const i8* sc = (const i8*)(b + 192) + h * 8 + is;
        float d = f16_to_f32(load_u16(b + 208));
        float s0 = d * sc[0], s1 = d * sc[2], s2 = d * sc[4], s3 = d * sc[6];
        for (int i = 0; i < 4; i++) {
            int l = l0 + i;
            int a = ql[l], c = ql[l + 32], hb = qh[l];
            int base = h * 128 + l;
            f(base, s0 * (float)(((a & 0xF) | ((hb & 3) << 4)) - 32));
            f(base + 32, s1 * (float)(((c & 0xF) | (((hb >> 2) & 3) << 4)) - 32));
            f(base + 64, s2 * (float)(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32));
            f(base + 96, s3 * (float)(((c >> 4) | (((hb >> 6) & 3) << 4)) - 32));
        }
    }
    // Inputs of the unit's 16 values, in the order `each` visits them.
    struct X { float v[16]; };
    __device__ static void load_x(const float* x, int u, X& xu) {
        const float* xb = x + (u >> 4) * 256 + ((u >> 3) & 1) * 128 + (u & 7) * 4;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            xu.v[4 * i] = xb[i];
            xu.v[4 * i + 1] = xb[i + 32];
            xu.v[4 * i + 2] = xb[i + 64];
            xu.v[4 * i + 3] = xb[i + 96];
        }
    }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        float acc = 0.f;
        int k = 0;
        each(block(w, cols, r, u), u, [&](int, float v) { acc += v * xu.v[k++]; });
        return acc;
    }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        T* ob = out + (u >> 4) * 256;
        each(block(w, cols, r, u), u, [&](int i, float v) { store_val(ob, i, v); });
    }
};

// ggml block_q4_0, 18 bytes per 32 values: d (f16), 16 bytes: value j = low nibble - 8,
// value j + 16 = high nibble - 8. A unit is one block; byte loads.
struct Q4_0 {
    __device__ static int units(int cols) { return cols >> 5; }
    template <class F>
    __device__ static void each(const u8* w, int cols, int r, int u, F f) {
        const u8* b = w + (size_t)r * (cols >> 5) * 18 + (size_t)u * 18;
        float d = f16_to_f32(load_u16(b));
        for (int j = 0; j < 16; j++) {
            int q = b[2 + j];
            f(u * 32 + j, (float)((q & 0xF) - 8) * d);
            f(u * 32 + j + 16, (float)((q >> 4) - 8) * d);
        }
    }
    struct X { const float* p; };
    __device__ static void load_x(const float* x, int u, X& xu) { xu.p = x; }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        float acc = 0.f;
        each(w, cols, r, u, [&](int i, float v) { acc += v * xu.p[i]; });
        return acc;
    }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        each(w, cols, r, u, [&](int i, float v) { store_val(out, i, v); });
    }
};

// 16-bit floats (BF16, F16): units of 8 values (one 16-byte load) when rows are 16-byte
// aligned (cols % 8 == 0), else single values.
template <bool BF>
struct Half {
    __device__ static float cvt(u16 h) { return BF ? bf16_to_f32(h) : f16_to_f32(h); }
    __device__ static int units(int cols) { return (cols & 7) ? cols : cols >> 3; }
    struct X { float v[8]; };
    __device__ static void load_x(const float* x, int u, X& xu) {
        // units of 8 only when cols % 8 == 0 (then x rows are 32-byte aligned)
        const float* p = x + (u << 3);
#pragma unroll
        for (int i = 0; i < 8; i++) xu.v[i] = p[i];
    }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        const u16* row = (const u16*)w + (size_t)r * cols;
        uint4 q = *(const uint4*)(row + (u << 3));
        u32 p[4] = {q.x, q.y, q.z, q.w};
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) acc += cvt((u16)(p[k] & 0xFFFF)) * xu.v[2 * k] + cvt((u16)(p[k] >> 16)) * xu.v[2 * k + 1];
        return acc;
    }
    // Rows whose length is not a multiple of 8: one value per unit.
    __device__ static float dot1(const u8* w, int cols, int r, int u, const float* x) { return cvt(((const u16*)w)[(size_t)r * cols + u]) * x[u]; }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        const u16* row = (const u16*)w + (size_t)r * cols;
        int n = (cols & 7) ? 1 : 8, i0 = u * n;
        for (int i = 0; i < n; i++) store_val(out, i0 + i, cvt(row[i0 + i]));
    }
};

struct F32 {
    __device__ static int units(int cols) { return (cols & 3) ? cols : cols >> 2; }
    struct X { float4 v; };
    __device__ static void load_x(const float* x, int u, X& xu) { xu.v = *(const float4*)(x + (u << 2)); }
    __device__ static float dot(const u8* w, int rows, int cols, int r, int u, const X& xu) {
        float4 a = *(const float4*)((const float*)w + (size_t)r * cols + (u << 2));
        return a.x * xu.v.x + a.y * xu.v.y + a.z * xu.v.z + a.w * xu.v.w;
    }
    __device__ static float dot1(const u8* w, int cols, int r, int u, const float* x) { return ((const float*)w)[(size_t)r * cols + u] * x[u]; }
    template <class T>
    __device__ static void decode(const u8* w, int rows, int cols, int r, int u, T* out) {
        const float* row = (const float*)w + (size_t)r * cols;
        int n = (cols & 3) ? 1 : 4, i0 = u * n;
        for (int i = 0; i < n; i++) store_val(out, i0 + i, row[i0 + i]);
    }
};
