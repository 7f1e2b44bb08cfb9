// Tensor-core helpers shared by flash.cu, flash_wgmma.cu and lightning.cu (prepended after
// common.cuh): bf16 packing, ldmatrix, mma.sync m16n8k16 bf16 with f32 accumulators,
// cp.async, and the A fragments of a tile of queries.
//
// Fragment layouts (lane = 4 * gid + tig): A (16x16, row-major) a[0] = (row gid, cols
// 2 tig, +1), a[1] = row gid + 8, a[2] = cols + 8, a[3] = both; B (16x8, column-major)
// b[0] = (rows 2 tig, +1, col gid), b[1] = rows + 8; C (16x8) c[0..1] = (row gid, cols
// 2 tig, +1), c[2..3] = row gid + 8.

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); }

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
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

// 16 bytes global -> shared without passing through registers; `ok` false zero-fills
// (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}
// 4 bytes (zeros when !ok); cp.async's .ca form, the one that takes sizes under 16
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
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
