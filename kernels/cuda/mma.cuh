// Tensor-core helpers shared by flash.cu, flash_wgmma.cu and lightning.cu (prepended after
// common.cuh): bf16 packing, ldmatrix, mma.sync m16n8k16 bf16 with f32 accumulators,
// cp.async, the A fragments of a tile of queries, and the online softmax over a tile of
// keys.
//
// Fragment layouts (lane = 4 * gid + tig): A (16x16, row-major) a[0] = (row gid, cols
// 2 tig, +1), a[1] = row gid + 8, a[2] = cols + 8, a[3] = both; B (16x8, column-major)
// b[0] = (rows 2 tig, +1, col gid), b[1] = rows + 8; C (16x8) c[0..1] = (row gid, cols
// 2 tig, +1), c[2..3] = row gid + 8.

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); }

// pack_bf16 in one instruction, for values that are never NaN (the softmax's probabilities):
// the same round to nearest even; only a NaN would differ (canonical instead of quieted)
__device__ __forceinline__ u32 pack_bf16_num(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x with subnormal results flushed to zero: exp2f without its subnormal rescaling (the
// same bits wherever the result is normal; the softmax's probabilities under 2^-126 count
// for nothing against the row's maximum, which is 1)
__device__ __forceinline__ float exp2_ftz(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Four 8x8 b16 matrices from shared memory; lane L gives the address of row L % 8 of
// matrix L / 8. Without .trans lane l receives (row l/4, cols 2(l%4), +1) of each matrix;
// with .trans (rows 2(l%4), +1, col l/4).
__device__ __forceinline__ void ldm4(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldm4t(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col)
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}



// A C-fragment row is spread over the 4 lanes of a group (tig 0..3): the maximum or the
// sum of each of a lane's two rows over its group, in every lane of the group.
__device__ __forceinline__ void quad_max(float& a, float& b) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
}
__device__ __forceinline__ void quad_sum(float& a, float& b) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// This lane's A fragments of a 16-row tile of queries: rows gid (p0) and gid + 8 (p1;
// null: a row past the end, zeros), dims kk*16 + 2 tig (+1, +8, +9). Each value is rotated
// by partial NeoX RoPE as it is read (table rows c0, c1; rd 0: none), scaled by
// scale * log2(e) for the exp2 softmax and rounded to bf16.
template <int KS>
__device__ __forceinline__ void q_fragments(u32 (&qf)[KS][4], const float* p0, const float* p1, const float2* c0, const float2* c1, int hd,
                                            int rd, float scale, int tig) {
    const float qs = scale * 1.4426950408889634f;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float* p = (i & 1) ? p1 : p0;
            const float2* c = (i & 1) ? c1 : c0;
            int d = kk * 16 + tig * 2 + ((i & 2) ? 8 : 0);
            float a = 0.f, b = 0.f;
            if (p) {
                if (d < hd) a = roped(p, d, rd, c) * qs;
                if (d + 1 < hd) b = roped(p, d + 1, rd, c) * qs;
            }
            qf[kk][i] = pack_bf16(a, b);
        }
    }
}

// One tile of keys j0 .. j0 + 8 NT for a lane's two rows (C fragments s[nt]: keys j0 + 8 nt
// + 2 tig, +1; rows at positions qp0 and qp1; scores in exp2 units): the causal mask, the
// online softmax update of the row maxima m and sums l (c0, c1: the factors that rescale
// the output accumulated so far), and the probabilities, in place of the scores. Each row
// is spread over the 4 lanes of a group.
template <int NT>
__device__ __forceinline__ void softmax_exp(float (&s)[NT][4], int j0, int qp0, int qp1, int tig, float& m0, float& m1, float& l0, float& l1,
                                            float& c0, float& c1) {
    const float ninf = __int_as_float(0xff800000);
    float mx0 = ninf, mx1 = ninf;
    // only a tile with a key past a row's position has anything to mask (qp0 < qp1)
    if (j0 + 8 * NT - 1 > qp0) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int j = j0 + nt * 8 + tig * 2;
            if (j > qp0) s[nt][0] = ninf;
            if (j + 1 > qp0) s[nt][1] = ninf;
            if (j > qp1) s[nt][2] = ninf;
            if (j + 1 > qp1) s[nt][3] = ninf;
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    quad_max(mx0, mx1);
    // rows past the prompt, or with no key yet, keep m = -inf: guard the exponents
    float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    c0 = n0 == m0 ? 1.f : exp2f(m0 - n0);
    c1 = n1 == m1 ? 1.f : exp2f(m1 - n1);
    float b0 = n0 == ninf ? 0.f : n0, b1 = n1 == ninf ? 0.f : n1;
    m0 = n0;
    m1 = n1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        s[nt][0] = exp2_ftz(s[nt][0] - b0);
        s[nt][1] = exp2_ftz(s[nt][1] - b0);
        s[nt][2] = exp2_ftz(s[nt][2] - b1);
        s[nt][3] = exp2_ftz(s[nt][3] - b1);
        ps0 += s[nt][0] + s[nt][1];
        ps1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * c0 + ps0;
    l1 = l1 * c1 + ps1;
}

// The probabilities of softmax_exp as bf16 A fragments pf[kk] of keys j0 + 16 kk .. (a C
// fragment of 8 keys is half of the A fragment of its 16)
template <int NT>
__device__ __forceinline__ void pack_p(const float (&s)[NT][4], u32 (&pf)[NT / 2][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        pf[nt / 2][(nt & 1) * 2] = pack_bf16_num(s[nt][0], s[nt][1]);
        pf[nt / 2][(nt & 1) * 2 + 1] = pack_bf16_num(s[nt][2], s[nt][3]);
    }
}

// softmax_exp, then pack_p
template <int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], int j0, int qp0, int qp1, int tig, float& m0, float& m1, float& l0,
                                             float& l1, float& c0, float& c1, u32 (&pf)[NT / 2][4]) {
    softmax_exp<NT>(s, j0, qp0, qp1, tig, m0, m1, l0, l1, c0, c1);
    pack_p<NT>(s, pf);
}
