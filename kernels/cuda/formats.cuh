// Weight formats as the GPU holds them, one struct per type. A matrix of `rows` x `cols`
// starts at `w`; each row splits into `units` (one or two 16-byte loads of weights).
//
// Quantized types (Q8_0, Q4_0, Q4_K, Q6_K) multiply int8 activations: the input row is
// quantized in blocks of 32 (`quantize_act` in dequant.cu: int8 values, one f32 scale per
// block, as ggml's Q8_0), and units are dotted with __dp4a, four products per instruction.
//   units(cols), XQ, load_xq(xq, xd, u, XQ&), WQ, load_w(w, rows, cols, r, u, WQ&),
//   dotw(WQ, u, XQ); dotq<F>(w, rows, cols, r, u, XQ) does both
// Float types (BF16, F16, F32) multiply f32 activations:
//   units(cols), X, load_x(x, u, X&), WX, load_w(w, rows, cols, r, u, WX&), dotw(WX, u, X);
//   dot<F>(w, rows, cols, r, u, X) does both
// load_w only loads (a unit of one row's weights into registers) and dotw only computes,
// so the matrix-vector kernels can have the next unit's loads in flight while they compute.
// Every type decodes 8 consecutive values: decode8(w, rows, cols, r, c, v) fills v[0..8)
// with W[r, c..c+8) (c a multiple of 8), for the coalesced dequantization kernels.
//
// Layouts (packed by kernels/src/cuda/matrix.rs at upload):
//   Q8_0  int8 values [rows][cols], then f16 scales [rows][cols/32]
//   Q4_0  nibbles [rows][cols/2] (block b: 16 bytes, value j low nibble, j+16 high), then
//         f16 scales [rows][cols/32]
//   Q4_K  ggml's blocks (144 bytes per 256 values), as in the file
//   Q6_K  ggml's blocks (210 bytes) each padded to 212, so that words are 4-byte aligned

// 8 values to 8 consecutive outputs (16 or 32 aligned bytes).
__device__ __forceinline__ void store8(u16* out, const float* v) {
    uint4 o;
    o.x = (u32)f32_to_bf16(v[0]) | ((u32)f32_to_bf16(v[1]) << 16);
    o.y = (u32)f32_to_bf16(v[2]) | ((u32)f32_to_bf16(v[3]) << 16);
    o.z = (u32)f32_to_bf16(v[4]) | ((u32)f32_to_bf16(v[5]) << 16);
    o.w = (u32)f32_to_bf16(v[6]) | ((u32)f32_to_bf16(v[7]) << 16);
    *(uint4*)out = o;
}
__device__ __forceinline__ void store8(float* out, const float* v) {
    ((float4*)out)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4*)out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store1(u16* out, float v) { *out = f32_to_bf16(v); }
__device__ __forceinline__ void store1(float* out, float v) { *out = v; }

__device__ __forceinline__ int dp4a(int a, int b, int c) { return __dp4a(a, b, c); }
// dp4a with a's bytes unsigned, b's signed
__device__ __forceinline__ int dp4a_us(u32 a, int b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Σ of the four signed bytes of b
__device__ __forceinline__ int bsum4(int b) { return __dp4a(0x01010101, b, 0); }

// Activations of one 32-block: 8 words of int8 values and the block's scale.
struct XBlock {
    int v[8];
    float d;
};
__device__ __forceinline__ void load_block(const i8* xq, const float* xd, int blk, XBlock& x) {
    const int4* p = (const int4*)(xq + blk * 32);
    int4 a = p[0], b = p[1];
    x.v[0] = a.x; x.v[1] = a.y; x.v[2] = a.z; x.v[3] = a.w;
    x.v[4] = b.x; x.v[5] = b.y; x.v[6] = b.z; x.v[7] = b.w;
    x.d = xd[blk];
}

struct Q8_0 {
    __device__ static int units(int cols) { return cols >> 5; }
    __device__ static float scale(const u8* w, int rows, int cols, int r, int u) {
        return f16_to_f32(((const u16*)(w + (size_t)rows * cols))[(size_t)r * (cols >> 5) + u]);
    }
    typedef XBlock XQ;
    __device__ static void load_xq(const i8* xq, const float* xd, int u, XQ& x) { load_block(xq, xd, u, x); }
    struct WQ {
        int4 a, b;
        u16 d;
    };
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WQ& q) {
        const int4* p = (const int4*)(w + (size_t)r * cols + (u << 5));
        q.a = p[0];
        q.b = p[1];
        q.d = ((const u16*)(w + (size_t)rows * cols))[(size_t)r * (cols >> 5) + u];
    }
    __device__ static float dotw(const WQ& q, int u, const XQ& x) {
        int s = dp4a(q.a.x, x.v[0], 0);
        s = dp4a(q.a.y, x.v[1], s); s = dp4a(q.a.z, x.v[2], s); s = dp4a(q.a.w, x.v[3], s);
        s = dp4a(q.b.x, x.v[4], s); s = dp4a(q.b.y, x.v[5], s); s = dp4a(q.b.z, x.v[6], s); s = dp4a(q.b.w, x.v[7], s);
        return (float)s * (f16_to_f32(q.d) * x.d);
    }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        uint2 q = *(const uint2*)(w + (size_t)r * cols + c);
        float d = scale(w, rows, cols, r, c >> 5);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = (float)(i8)((q.x >> (8 * i)) & 0xFF) * d;
            v[i + 4] = (float)(i8)((q.y >> (8 * i)) & 0xFF) * d;
        }
    }
};

struct Q4_0 {
    __device__ static int units(int cols) { return cols >> 5; }
    __device__ static float scale(const u8* w, int rows, int cols, int r, int u) {
        return f16_to_f32(((const u16*)(w + (size_t)rows * (cols >> 1)))[(size_t)r * (cols >> 5) + u]);
    }
    typedef XBlock XQ;
    __device__ static void load_xq(const i8* xq, const float* xd, int u, XQ& x) { load_block(xq, xd, u, x); }
    struct WQ {
        int4 q;
        u16 d;
    };
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WQ& q) {
        q.q = *(const int4*)(w + (size_t)r * (cols >> 1) + (u << 4));
        q.d = ((const u16*)(w + (size_t)rows * (cols >> 1)))[(size_t)r * (cols >> 5) + u];
    }
    __device__ static float dotw(const WQ& wq, int u, const XQ& x) {
        const int4& q = wq.q;
        const int M = 0x0F0F0F0F;
        int s = dp4a(q.x & M, x.v[0], 0);
        s = dp4a(q.y & M, x.v[1], s); s = dp4a(q.z & M, x.v[2], s); s = dp4a(q.w & M, x.v[3], s);
        s = dp4a((q.x >> 4) & M, x.v[4], s); s = dp4a((q.y >> 4) & M, x.v[5], s);
        s = dp4a((q.z >> 4) & M, x.v[6], s); s = dp4a((q.w >> 4) & M, x.v[7], s);
        int sx = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) sx = dp4a(0x01010101, x.v[i], sx);
        return (float)(s - 8 * sx) * (f16_to_f32(wq.d) * x.d);
    }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        int b = c >> 5, o = c & 31;
        uint2 q = *(const uint2*)(w + (size_t)r * (cols >> 1) + b * 16 + (o & 15));
        int shift = o >= 16 ? 4 : 0;
        float d = scale(w, rows, cols, r, b);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = (float)((int)((q.x >> (8 * i + shift)) & 0xF) - 8) * d;
            v[i + 4] = (float)((int)((q.y >> (8 * i + shift)) & 0xF) - 8) * d;
        }
    }
};

// ggml block_q4_K, 144 bytes per 256 values: d, dmin (f16), 12 bytes of 6-bit scales and
// mins, 128 bytes of nibbles. A unit is 32 bytes of nibbles, 64 values: 32 low nibbles
// (sub-block 2j) and 32 high nibbles (sub-block 2j+1), j = u % 4. Each unit decodes its
// two (scale, min) pairs once for 64 values.
struct Q4_K {
    __device__ static int units(int cols) { return cols >> 6; }
    // The block's 16-byte header in one load: d and dmin (f16) in .x, the 12 bytes of
    // packed 6-bit scales and mins in .y, .z, .w. Blocks are 144 bytes from a 256-byte
    // aligned start, so every header is 16-byte aligned.
    __device__ static uint4 header(const u8* b) { return *(const uint4*)b; }
    // sub-block k's 6-bit scale and min (branch-free: lanes of one warp take different k)
    __device__ static void scale_min(const uint4& h, int k, float& sc, float& m) {
        int sh = (k & 3) * 8;
        int a = (h.y >> sh) & 0xFF, b = (h.z >> sh) & 0xFF, c = (h.w >> sh) & 0xFF;
        int s_lo = a & 63, m_lo = b & 63;
        int s_hi = (c & 0xF) | ((a >> 6) << 4), m_hi = (c >> 4) | ((b >> 6) << 4);
        sc = (float)(k < 4 ? s_lo : s_hi);
        m = (float)(k < 4 ? m_lo : m_hi);
    }
    // Sub-blocks 2j and 2j + 1's scales and mins, the same integers as scale_min:
    // both sub-blocks lie in one half (j < 2: bytes of .y and .z; j >= 2: nibbles of .w with
    // two high bits from .y and .z), so one lane-constant choice serves the four values.
    __device__ static void scale_min2(const uint4& h, int j, float& sc0, float& m0, float& sc1, float& m1) {
        bool high = j >= 2;
        int s0 = (2 * j & 3) * 8, s1 = s0 + 8;
        u32 ps = high ? h.w : h.y, pm = high ? h.w >> 4 : h.z;
        u32 ma = high ? 0xFu : 63u, mb = high ? 0x30u : 0u;
        sc0 = (float)(((ps >> s0) & ma) | ((h.y >> (s0 + 2)) & mb));
        sc1 = (float)(((ps >> s1) & ma) | ((h.y >> (s1 + 2)) & mb));
        m0 = (float)(((pm >> s0) & ma) | ((h.z >> (s0 + 2)) & mb));
        m1 = (float)(((pm >> s1) & ma) | ((h.z >> (s1 + 2)) & mb));
    }
    __device__ static const u8* block(const u8* w, int cols, int r, int u) { return w + (size_t)r * (cols >> 8) * 144 + (size_t)(u >> 2) * 144; }
    // The 32 inputs of the low nibbles and of the high nibbles, their blocks' scales, sums.
    struct XQ {
        int l[8], h[8];
        float dl, dh;
        int sl, sh;
    };
    __device__ static void load_xq(const i8* xq, const float* xd, int u, XQ& x) {
        int blk = (u >> 2) * 8 + 2 * (u & 3);
        const int4* pl = (const int4*)(xq + blk * 32);
        const int4* ph = (const int4*)(xq + (blk + 1) * 32);
        int4 a0 = pl[0], a1 = pl[1], b0 = ph[0], b1 = ph[1];
        x.l[0] = a0.x; x.l[1] = a0.y; x.l[2] = a0.z; x.l[3] = a0.w;
        x.l[4] = a1.x; x.l[5] = a1.y; x.l[6] = a1.z; x.l[7] = a1.w;
        x.h[0] = b0.x; x.h[1] = b0.y; x.h[2] = b0.z; x.h[3] = b0.w;
        x.h[4] = b1.x; x.h[5] = b1.y; x.h[6] = b1.z; x.h[7] = b1.w;
        x.dl = xd[blk];
        x.dh = xd[blk + 1];
        sums(x);
    }
    // Σ of the low and of the high inputs (for the mins)
    __device__ static void sums(XQ& x) {
        int sl = 0, sh = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sl += bsum4(x.l[i]);
            sh += bsum4(x.h[i]);
        }
        x.sl = sl;
        x.sh = sh;
    }
    struct WQ {
        int4 q0, q1;
        uint4 hd;
    };
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WQ& q) {
        const u8* b = block(w, cols, r, u);
        const int4* qp = (const int4*)(b + 16 + ((u & 3) << 5));
        q.q0 = qp[0];
        q.q1 = qp[1];
        q.hd = header(b);
    }
    __device__ static float dotw(const WQ& wq, int u, const XQ& x) {
        int j = u & 3;
        const int4 &q0 = wq.q0, &q1 = wq.q1;
        const uint4& hd = wq.hd;
        float d = f16_to_f32((u16)(hd.x & 0xFFFF)), dmin = f16_to_f32((u16)(hd.x >> 16));
        float sc0, m0, sc1, m1;
        scale_min2(hd, j, sc0, m0, sc1, m1);
        const int M = 0x0F0F0F0F;
        int lo = dp4a(q0.x & M, x.l[0], 0);
        lo = dp4a(q0.y & M, x.l[1], lo); lo = dp4a(q0.z & M, x.l[2], lo); lo = dp4a(q0.w & M, x.l[3], lo);
        lo = dp4a(q1.x & M, x.l[4], lo); lo = dp4a(q1.y & M, x.l[5], lo); lo = dp4a(q1.z & M, x.l[6], lo); lo = dp4a(q1.w & M, x.l[7], lo);
        // the high nibbles dotted in place: their bytes masked, not shifted, so that every
        // product is 16 times the nibble's and one exact shift of the sum undoes it
        const u32 H = 0xF0F0F0F0u;
        int h = dp4a_us((u32)q0.x & H, x.h[0], 0);
        h = dp4a_us((u32)q0.y & H, x.h[1], h); h = dp4a_us((u32)q0.z & H, x.h[2], h); h = dp4a_us((u32)q0.w & H, x.h[3], h);
        h = dp4a_us((u32)q1.x & H, x.h[4], h); h = dp4a_us((u32)q1.y & H, x.h[5], h); h = dp4a_us((u32)q1.z & H, x.h[6], h);
        h = dp4a_us((u32)q1.w & H, x.h[7], h);
        int hi = h >> 4;  // |h| < 2^31: at most 32 x 240 x 128
        return d * (sc0 * x.dl * (float)lo + sc1 * x.dh * (float)hi) - dmin * (m0 * x.dl * (float)x.sl + m1 * x.dh * (float)x.sh);
    }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        const u8* b = w + (size_t)r * (cols >> 8) * 144 + (size_t)(c >> 8) * 144;
        int wi = c & 255, j = wi >> 6, high = (wi >> 5) & 1, l = wi & 31;
        uint2 q = *(const uint2*)(b + 16 + j * 32 + l);
        uint4 hd = header(b);
        float sc, m;
        scale_min(hd, 2 * j + high, sc, m);
        float d = f16_to_f32((u16)(hd.x & 0xFFFF)) * sc, mn = f16_to_f32((u16)(hd.x >> 16)) * m;
        int shift = high * 4;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = d * (float)((q.x >> (8 * i + shift)) & 0xF) - mn;
            v[i + 4] = d * (float)((q.y >> (8 * i + shift)) & 0xF) - mn;
        }
    }
};

// ggml block_q6_K in 212-byte slots: ql[128], qh[64], int8 scales[16], d (f16), 2 pad.
// A unit is 16 values: half h, positions l0..l0+3 (l0 = 4g) of each of the four 32-wide
// quarters; the quarters' 6-bit values come out of one ql word pair and one qh word.
struct Q6_K {
    __device__ static int units(int cols) { return cols >> 4; }
    __device__ static const u8* block(const u8* w, int cols, int r, int u) { return w + (size_t)r * (cols >> 8) * 212 + (size_t)(u >> 4) * 212; }
    // The four quarters' 6-bit values (as unsigned bytes, value = byte - 32) of a unit, from
    // its low-nibble words a, c and its high-bit word hb.
    __device__ static void words(int a, int c, int hb, int q[4]) {
        const int M = 0x0F0F0F0F, H = 0x30303030;
        q[0] = (a & M) | ((hb << 4) & H);
        q[1] = (c & M) | ((hb << 2) & H);
        q[2] = ((a >> 4) & M) | (hb & H);
        q[3] = ((c >> 4) & M) | ((hb >> 2) & H);
    }
    struct XQ {
        int v[4], s[4];
        float d[4];
    };
    __device__ static void load_xq(const i8* xq, const float* xd, int u, XQ& x) {
        int sb = u >> 4, h = (u >> 3) & 1, l0 = (u & 7) * 4;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int blk = sb * 8 + h * 4 + k;
            x.v[k] = *(const int*)(xq + blk * 32 + l0);
            x.s[k] = bsum4(x.v[k]);
            x.d[k] = xd[blk];
        }
    }
    struct WQ {
        int a, c, hb;
        i8 sc[4];
        u16 d;
    };
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WQ& q) {
        const u8* b = block(w, cols, r, u);
        int h = (u >> 3) & 1, l0 = (u & 7) * 4;
        q.a = *(const int*)(b + h * 64 + l0);
        q.c = *(const int*)(b + h * 64 + l0 + 32);
        q.hb = *(const int*)(b + 128 + h * 32 + l0);
        const i8* sc = (const i8*)(b + 192) + h * 8 + (l0 >> 4);
#pragma unroll
        for (int k = 0; k < 4; k++) q.sc[k] = sc[2 * k];
        q.d = *(const u16*)(b + 208);
    }
    __device__ static float dotw(const WQ& wq, int u, const XQ& x) {
        int q[4];
        words(wq.a, wq.c, wq.hb, q);
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) acc += (float)wq.sc[k] * x.d[k] * (float)(dp4a(q[k], x.v[k], 0) - 32 * x.s[k]);
        return f16_to_f32(wq.d) * acc;
    }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        const u8* b = w + (size_t)r * (cols >> 8) * 212 + (size_t)(c >> 8) * 212;
        int wi = c & 255, h = wi >> 7, k = (wi >> 5) & 3, l = wi & 31;
        const u8* ql = b + h * 64 + l + (k & 1) * 32;
        const u8* qh = b + 128 + h * 32 + l;
        float s = f16_to_f32(*(const u16*)(b + 208)) * (float)((const i8*)(b + 192))[h * 8 + (l >> 4) + 2 * k];
        int lshift = (k >> 1) * 4, hshift = 2 * k;
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = s * (float)((int)(((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32);
    }
};

// 16-bit floats (BF16, F16): units of 8 values (one 16-byte load) when rows are 16-byte
// aligned (cols % 8 == 0); otherwise the launcher picks the one-value kernel (dot1).
template <bool BF>
struct Half {
    __device__ static float cvt(u16 h) { return BF ? bf16_to_f32(h) : f16_to_f32(h); }
    __device__ static int units(int cols) { return (cols & 7) ? cols : cols >> 3; }
    struct X { float v[8]; };
    __device__ static void load_x(const float* x, int u, X& xu) {
        const float4* p = (const float4*)(x + (u << 3));
        float4 a = p[0], b = p[1];
        xu.v[0] = a.x; xu.v[1] = a.y; xu.v[2] = a.z; xu.v[3] = a.w;
        xu.v[4] = b.x; xu.v[5] = b.y; xu.v[6] = b.z; xu.v[7] = b.w;
    }
    typedef uint4 WX;
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WX& q) { q = *(const uint4*)((const u16*)w + (size_t)r * cols + (u << 3)); }
    __device__ static float dotw(const WX& q, int u, const X& xu) {
        u32 p[4] = {q.x, q.y, q.z, q.w};
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) acc += cvt((u16)(p[k] & 0xFFFF)) * xu.v[2 * k] + cvt((u16)(p[k] >> 16)) * xu.v[2 * k + 1];
        return acc;
    }
    __device__ static float dot1(const u8* w, int cols, int r, int u, const float* x) { return cvt(((const u16*)w)[(size_t)r * cols + u]) * x[u]; }
    __device__ static float value(const u8* w, int cols, int r, int c) { return cvt(((const u16*)w)[(size_t)r * cols + c]); }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        uint4 q = *(const uint4*)((const u16*)w + (size_t)r * cols + c);
        u32 p[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = cvt((u16)(p[k] & 0xFFFF));
            v[2 * k + 1] = cvt((u16)(p[k] >> 16));
        }
    }
};

struct F32 {
    __device__ static int units(int cols) { return (cols & 3) ? cols : cols >> 2; }
    struct X { float4 v; };
    __device__ static void load_x(const float* x, int u, X& xu) { xu.v = *(const float4*)(x + (u << 2)); }
    typedef float4 WX;
    __device__ static void load_w(const u8* w, int rows, int cols, int r, int u, WX& a) { a = *(const float4*)((const float*)w + (size_t)r * cols + (u << 2)); }
    __device__ static float dotw(const WX& a, int u, const X& xu) { return a.x * xu.v.x + a.y * xu.v.y + a.z * xu.v.z + a.w * xu.v.w; }
    __device__ static float dot1(const u8* w, int cols, int r, int u, const float* x) { return ((const float*)w)[(size_t)r * cols + u] * x[u]; }
    __device__ static float value(const u8* w, int cols, int r, int c) { return ((const float*)w)[(size_t)r * cols + c]; }
    __device__ static void decode8(const u8* w, int rows, int cols, int r, int c, float* v) {
        const float4* p = (const float4*)((const float*)w + (size_t)r * cols + c);
        float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
};

// One row-unit's product, its weights loaded first (quantized types, then float types).
template <class F>
__device__ float dotq(const u8* w, int rows, int cols, int r, int u, const typename F::XQ& x) {
    typename F::WQ q;
    F::load_w(w, rows, cols, r, u, q);
    return F::dotw(q, u, x);
}
template <class F>
__device__ float dot(const u8* w, int rows, int cols, int r, int u, const typename F::X& x) {
    typename F::WX q;
    F::load_w(w, rows, cols, r, u, q);
    return F::dotw(q, u, x);
}

// Row r of a float matrix (F: F32, Half) times x, by a whole block: each thread strides over
// the row's 16-byte units, then the block sums (every thread gets the result). The
// router's product (matvec.cu's matvec_wide, moe.cu's route_fused): a few long rows.
// (block_row_part_dot: columns 0..n_cols of the row.)
template <class F>
__device__ float block_row_part_dot(const u8* w, int rows, int cols, int n_cols, const float* x, int r, float* scratch) {
    float acc = 0.f;
    int n = F::units(n_cols);
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        typename F::X v;
        F::load_x(x, u, v);
        acc += dot<F>(w, rows, cols, r, u, v);
    }
    return block_sum(acc, scratch);
}
template <class F>
__device__ float block_row_dot(const u8* w, int rows, int cols, const float* x, int r, float* scratch) {
    return block_row_part_dot<F>(w, rows, cols, cols, x, r, scratch);
}
