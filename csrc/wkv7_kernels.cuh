// WKV-7 CUDA kernels: training forward, the two backward passes, prefill (the forward without saved activations)
// and the batched one-token decode step.
//
// Maths (per head; S is N x N fp32, indexed [value i, key j]; decay_t = exp(-e^-0.5 sigmoid(w_t))):
//   S_t = S_{t-1} diag(decay_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,      y_t = S_t r_t
//
// Design. Every row i of S evolves on its own (sa_i = S[i,:].a only reads row i), and so does every row of the
// adjoint G = dL/dS. Every *column* j of S and of G evolves on its own as well once the per-row scalars sa_t and
// gb_t = G_t b_t are known. So the work splits into three "line recurrences", each a sequential scan over time
// where a line (a row or a column of an N x N matrix) lives in registers and the per-step input vectors are
// broadcast from shared memory:
//   fwd   (rows of S, forward in time):   sa, S update, y.  Saves sa and S every CHUNK steps (transposed).
//   rows  (rows of G, backward in time):  G += dy r^T; dv = G k; gb = G b; G = G diag(decay) + gb a^T.
//   cols  (columns of S and G, backward): S_{t-1} by inverting the update (decay >= 0.545, and the exact
//         checkpoint is reloaded every CHUNK steps), the column sums dr, dk, db, dw, da.
// No pass needs a barrier inside a chunk: threads only share the staged inputs. A line is split over P
// consecutive lanes (E = N/P elements each, reduced with xor shuffles) and a thread may hold R lines (so one
// shared-memory load feeds R lines). P, R and the lines per block LB are chosen per shape on the host: few heads
// need many threads per line to fill the GPU, many heads need few to keep the arithmetic free of shuffles.
//
// Inputs are staged CHUNK steps at a time with cp.async into a double buffer (the next chunk loads while this one
// computes), then converted once to fp32 with the chunk's decay products folded in (see "Rescaled basis" below).
// Steps past T are identity steps (zero r, k, v, a, b, dy; decay 1), so callers never pad.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wkv7.h"

namespace wkv7 {

constexpr int CHUNK = kChunk;
constexpr float DECAY_SCALE = 0.6065306597126334f;    // exp(-0.5)

// ---------------------------------------------------------------------------------------------------------------
// small helpers

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The decay maths use the hardware approximations (MUFU; relative error about 2^-22, far below the fp32 tolerance of
// the tests): the IEEE expf, division and __frcp_rn took a tenth of the forward's instructions on an H100.
__device__ __forceinline__ float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float sigmoid_f(float x) { return fast_rcp(1.f + __expf(-x)); }
__device__ __forceinline__ float decay_of(float x) { return __expf(-DECAY_SCALE * sigmoid_f(x)); }

// Sum over the P consecutive lanes that share a line (every lane gets the total).
template <int P>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int m = P / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// 16-byte global -> shared copy, asynchronous where the chip has cp.async; zero-fills when !valid.
__device__ __forceinline__ void copy16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#else
    *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void copy_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Offset of element (b, t, h, n) in a [B, T, H, N] tensor.
__device__ __forceinline__ int64_t at_bthn(int b, int t, int h, int n, int T_, int H, int N) {
    return ((static_cast<int64_t>(b) * T_ + t) * H + h) * N + n;
}

// The 16-byte pieces one thread copies when staging steps t0 .. t0+CHUNK-1 of head (b, h) of a [B, T, H, N] tensor
// with elements of type E into [CHUNK][N] (rows past T are zero-filled). Every input has that layout, so the
// offsets are worked out once per chunk and element type and serve all the tensors.
template <typename E, int N, int NT>
struct ChunkPieces {
    static constexpr int VEC = 16 / sizeof(E);
    static constexpr int PER_ROW = N / VEC;
    static constexpr int COUNT = CHUNK * PER_ROW;         // pieces per chunk
    static constexpr int MAX = (COUNT + NT - 1) / NT;      // pieces per thread
    static_assert(N % VEC == 0, "a head's row must be a whole number of 16-byte pieces");
    int64_t src[MAX];
    int dst[MAX];
    bool ok[MAX], mine[MAX];

    __device__ __forceinline__ ChunkPieces(int b, int t0, int T_, int H, int h, int tid) {
#pragma unroll
        for (int i = 0; i < MAX; i++) {
            const int idx = tid + i * NT, s = idx / PER_ROW, c = (idx % PER_ROW) * VEC, t = t0 + s;
            mine[i] = COUNT % NT == 0 || idx < COUNT;
            ok[i] = t < T_;
            src[i] = at_bthn(b, ok[i] ? t : 0, h, c, T_, H, N);
            dst[i] = s * N + c;
        }
    }
    __device__ __forceinline__ void copy(E* to, const E* from) const {
#pragma unroll
        for (int i = 0; i < MAX; i++)
            if (mine[i]) copy16(to + dst[i], from + src[i], ok[i]);
    }
    // tensor number n of `from` into to + n * stride
    template <typename... Src>
    __device__ __forceinline__ void copy_each(E* to, int stride, Src... from) const {
        int n = 0;
        (copy(to + stride * n++, from), ...);
    }
};

// Thread layout shared by the three line kernels: thread = (group g, lane q); group g owns lines
// l0 + rr*G + g (rr < R); lane q owns elements 4*(e4*P + q) + c (e4 < E/4, c < 4), so the P lanes of a group read
// adjacent 16-byte pieces of a broadcast vector (no bank conflicts) and a vector load feeds R lines.
template <int N, int P, int R, int LB>
struct Layout {
    static constexpr int E = N / P;          // elements per line per thread
    static constexpr int V4 = E / 4;         // float4 pieces per line per thread
    static constexpr int G = LB / R;         // groups per block
    static constexpr int NT = G * P;         // threads per block
    static_assert(N % P == 0 && E % 4 == 0, "each lane must own whole float4 pieces of a line");
    static_assert(LB % R == 0 && N % LB == 0, "lines must split evenly");
    static_assert(NT % 32 == 0 || P == 1, "shuffle groups need whole warps");
    // blocks per multiprocessor promised to ptxas: four warps' worth of threads at least, which lets small blocks
    // keep up to 255 registers (without it ptxas caps some at 128 and spills)
    static constexpr int MIN_BLOCKS = NT >= 256 ? 1 : 256 / NT;
    __device__ static __forceinline__ int elem(int e4, int c, int q) { return 4 * (e4 * P + q) + c; }
};

// ---------------------------------------------------------------------------------------------------------------
// Rescaled basis. Inside one chunk the decay is folded into the broadcast vectors so that no per-element multiply
// by the decay is left in the inner loops. For the rows of S (forward), with D_s = prod_{s' <= s} decay_{s'} per key
// j (D_{-1} = 1) and S^_s = S_s / D_s (elementwise over j):
//     sa = S^_{s-1} . (a D_{s-1}),   S^_s = S^_{s-1} + sa (b / D_s) + v (k / D_s),   y = S^_s . (r D_s)
// and S = S^ D_15 at the chunk's end. Decay >= 0.545 keeps D_15 >= 6e-5: no overflow, and the products round like
// the unscaled ones. The backward passes use the mirror image (products taken from the chunk's end).

template <int E, int V4, int P>
__device__ __forceinline__ void load_line(float (&x)[E], const float* src, int q) {
#pragma unroll
    for (int e4 = 0; e4 < V4; e4++) {
        const float4 u = *reinterpret_cast<const float4*>(src + 4 * (e4 * P + q));
        x[4 * e4] = u.x; x[4 * e4 + 1] = u.y; x[4 * e4 + 2] = u.z; x[4 * e4 + 3] = u.w;
    }
}

template <int E, int V4, int P>
__device__ __forceinline__ void store_line(const float (&x)[E], float* dst, int q) {
#pragma unroll
    for (int e4 = 0; e4 < V4; e4++)
        *reinterpret_cast<float4*>(dst + 4 * (e4 * P + q)) =
            make_float4(x[4 * e4], x[4 * e4 + 1], x[4 * e4 + 2], x[4 * e4 + 3]);
}

// x *= vec (elementwise over the thread's elements), vec a shared-memory vector of N floats
template <int E, int V4, int P>
__device__ __forceinline__ void scale_line(float (&x)[E], const float* vec, int q) {
#pragma unroll
    for (int e4 = 0; e4 < V4; e4++) {
        const float4 u = reinterpret_cast<const float4*>(vec)[e4 * P + q];
        x[4 * e4] *= u.x; x[4 * e4 + 1] *= u.y; x[4 * e4 + 2] *= u.z; x[4 * e4 + 3] *= u.w;
    }
}

__device__ __forceinline__ float sum8(const float (&c)[2][4]) {
    return ((c[0][0] + c[1][0]) + (c[0][1] + c[1][1])) + ((c[0][2] + c[1][2]) + (c[0][3] + c[1][3]));
}

// ---------------------------------------------------------------------------------------------------------------
// Forward over rows of S. TRAIN: also writes sa [B,T,H,N] and the checkpoints ckpt [B,H,nC,N(j),N(i)] (the state
// after each chunk, transposed for the column pass). Prefill: state_in == state_out is allowed (in place).

template <typename T, int N>
constexpr size_t line_smem() { return 2 * 6 * CHUNK * N * sizeof(T) + (4 * CHUNK * N + N) * sizeof(float); }

template <typename T, int N, int P, int R, int LB, bool TRAIN>
__global__ void __launch_bounds__(Layout<N, P, R, LB>::NT, Layout<N, P, R, LB>::MIN_BLOCKS)
fwd_kernel(const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
           const T* __restrict__ a, const T* __restrict__ bb, const float* state_in, float* state_out,
           T* __restrict__ y, float* __restrict__ sa_out, float* __restrict__ ckpt, int B, int T_, int H) {
    using L = Layout<N, P, R, LB>;
    constexpr int E = L::E, V4 = L::V4, NT = L::NT;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int l0 = blockIdx.y * LB;
    const int tid = threadIdx.x, g = tid / P, q = tid % P;
    const int nC = (T_ + CHUNK - 1) / CHUNK;

    // raw[2][6][CHUNK][N] (r, w, k, a, b, v), then f32 [CHUNK][N] each: a D_{s-1}, b / D_s, k / D_s, r D_s; D_15 [N]
    extern __shared__ __align__(16) unsigned char smem[];
    T* raw = reinterpret_cast<T*>(smem);
    constexpr int V = CHUNK * N;
    float* fa = reinterpret_cast<float*>(smem + 2 * 6 * V * sizeof(T));
    float *fb = fa + V, *fk = fa + 2 * V, *fr = fa + 3 * V, *fend = fa + 4 * V;

    float S[R][E];
#pragma unroll
    for (int rr = 0; rr < R; rr++)
        load_line<E, V4, P>(S[rr], state_in + (static_cast<int64_t>(bh) * N + l0 + rr * L::G + g) * N, q);

    auto issue = [&](int ci, int buf) {
        ChunkPieces<T, N, NT>(b, ci * CHUNK, T_, H, h, tid).copy_each(raw + buf * 6 * V, V, r, w, k, a, bb, v);
        copy_commit();
    };
    if (nC > 0) issue(0, 0);

    for (int ci = 0; ci < nC; ci++) {
        const int t0 = ci * CHUNK, buf = ci & 1;
        copy_wait_all();
        __syncthreads();  // this chunk landed for everyone; the previous chunk's compute is over
        if (ci + 1 < nC) issue(ci + 1, buf ^ 1);
        const T* cur = raw + buf * 6 * V;
        for (int j = tid; j < N; j += NT) {  // one key per thread: the decay products run along the chunk
            float dec[CHUNK];
#pragma unroll
            for (int s = 0; s < CHUNK; s++) dec[s] = t0 + s < T_ ? decay_of(to_f32(cur[V + s * N + j])) : 1.f;
            float D = 1.f;
#pragma unroll
            for (int s = 0; s < CHUNK; s++) {
                const int o = s * N + j;
                fa[o] = to_f32(cur[3 * V + o]) * D;
                D *= dec[s];
                const float inv = fast_rcp(D);
                fb[o] = to_f32(cur[4 * V + o]) * inv;
                fk[o] = to_f32(cur[2 * V + o]) * inv;
                fr[o] = to_f32(cur[o]) * D;
            }
            fend[j] = D;
        }
        __syncthreads();
        const T* cv = cur + 5 * V;

        for (int s = 0; s < CHUNK; s++) {
            const int t = t0 + s;
            const float4* A4 = reinterpret_cast<const float4*>(fa + s * N) + q;
            float sa[R];
            {
                float acc[R][2][4];
#pragma unroll
                for (int rr = 0; rr < R; rr++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[rr][c / 4][c % 4] = 0.f;
#pragma unroll
                for (int e4 = 0; e4 < V4; e4++) {
                    const float4 u = A4[e4 * P];
                    const float ua[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                    for (int rr = 0; rr < R; rr++)
#pragma unroll
                        for (int c = 0; c < 4; c++)
                            acc[rr][e4 & 1][c] = fmaf(S[rr][4 * e4 + c], ua[c], acc[rr][e4 & 1][c]);
                }
#pragma unroll
                for (int rr = 0; rr < R; rr++) sa[rr] = group_sum<P>(sum8(acc[rr]));
            }
            float vv[R];
#pragma unroll
            for (int rr = 0; rr < R; rr++) vv[rr] = to_f32(cv[s * N + l0 + rr * L::G + g]);

            const float4* B4 = reinterpret_cast<const float4*>(fb + s * N) + q;
            const float4* K4 = reinterpret_cast<const float4*>(fk + s * N) + q;
            const float4* R4 = reinterpret_cast<const float4*>(fr + s * N) + q;
            float acc[R][2][4];
#pragma unroll
            for (int rr = 0; rr < R; rr++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[rr][c / 4][c % 4] = 0.f;
#pragma unroll
            for (int e4 = 0; e4 < V4; e4++) {
                const float4 bv = B4[e4 * P], kv = K4[e4 * P], rv = R4[e4 * P];
                const float ba[4] = {bv.x, bv.y, bv.z, bv.w}, ka[4] = {kv.x, kv.y, kv.z, kv.w};
                const float ra[4] = {rv.x, rv.y, rv.z, rv.w};
#pragma unroll
                for (int rr = 0; rr < R; rr++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        float& x = S[rr][4 * e4 + c];
                        x = fmaf(sa[rr], ba[c], fmaf(vv[rr], ka[c], x));
                        acc[rr][e4 & 1][c] = fmaf(x, ra[c], acc[rr][e4 & 1][c]);
                    }
            }
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                const float yy = group_sum<P>(sum8(acc[rr]));
                if (q == rr % P && t < T_) {
                    const int64_t o = at_bthn(b, t, h, l0 + rr * L::G + g, T_, H, N);
                    y[o] = from_f32<T>(yy);
                    if (TRAIN) sa_out[o] = sa[rr];
                }
            }
        }

#pragma unroll
        for (int rr = 0; rr < R; rr++) scale_line<E, V4, P>(S[rr], fend, q);  // back to S proper
        if (TRAIN) {  // the state after this chunk, stored [j][i] so the column pass reads it as float4
            float* dst = ckpt + (static_cast<int64_t>(bh) * nC + ci) * N * N;
#pragma unroll
            for (int rr = 0; rr < R; rr++)
#pragma unroll
                for (int e4 = 0; e4 < V4; e4++)
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        dst[L::elem(e4, c, q) * N + l0 + rr * L::G + g] = S[rr][4 * e4 + c];
        }
    }

#pragma unroll
    for (int rr = 0; rr < R; rr++)
        store_line<E, V4, P>(S[rr], state_out + (static_cast<int64_t>(bh) * N + l0 + rr * L::G + g) * N, q);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward pass 1, over rows of G = dL/dS, backward in time. Writes dv and gb = G_t b_t ([B,T,H,N] fp32, read by
// pass 2) and the gradient of the initial state. dstate_out (may be null) seeds G. Rescaled with the products
// P_s = prod_{s < s' <= 15} decay_{s'} (P_15 = 1), G^_s = G_s / P_s:
//     G^_s += dy (r / P_s);  dv = G^_s . (k P_s);  gb = G^_s . (b P_s);  G^_{s-1} = G^_s + gb (a / P_{s-1})
// and G = G^ P_{-1} when the chunk is done.

template <typename T, int N, int P, int R, int LB>
__global__ void __launch_bounds__(Layout<N, P, R, LB>::NT, Layout<N, P, R, LB>::MIN_BLOCKS)
bwd_rows_kernel(const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ a,
                const T* __restrict__ bb, const T* __restrict__ dy, const float* __restrict__ dstate_out,
                T* __restrict__ dv, float* __restrict__ gb_out, float* __restrict__ dstate_in, int B, int T_, int H) {
    using L = Layout<N, P, R, LB>;
    constexpr int E = L::E, V4 = L::V4, NT = L::NT;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int l0 = blockIdx.y * LB;
    const int tid = threadIdx.x, g = tid / P, q = tid % P;
    const int nC = (T_ + CHUNK - 1) / CHUNK;

    // raw[2][6][CHUNK][N] (r, w, k, a, b, dy), then f32 [CHUNK][N] each: r / P_s, k P_s, b P_s, a / P_{s-1}; P_{-1}
    extern __shared__ __align__(16) unsigned char smem[];
    T* raw = reinterpret_cast<T*>(smem);
    constexpr int V = CHUNK * N;
    float* fr = reinterpret_cast<float*>(smem + 2 * 6 * V * sizeof(T));
    float *fk = fr + V, *fb = fr + 2 * V, *fa = fr + 3 * V, *fend = fr + 4 * V;

    float G[R][E];
#pragma unroll
    for (int rr = 0; rr < R; rr++) {
        if (dstate_out) {
            load_line<E, V4, P>(G[rr], dstate_out + (static_cast<int64_t>(bh) * N + l0 + rr * L::G + g) * N, q);
        } else {
#pragma unroll
            for (int e = 0; e < E; e++) G[rr][e] = 0.f;
        }
    }

    auto issue = [&](int ci, int buf) {
        ChunkPieces<T, N, NT>(b, ci * CHUNK, T_, H, h, tid).copy_each(raw + buf * 6 * V, V, r, w, k, a, bb, dy);
        copy_commit();
    };
    if (nC > 0) issue(nC - 1, 0);

    for (int it = 0; it < nC; it++) {
        const int ci = nC - 1 - it, t0 = ci * CHUNK, buf = it & 1;
        copy_wait_all();
        __syncthreads();
        if (ci > 0) issue(ci - 1, buf ^ 1);
        const T* cur = raw + buf * 6 * V;
        for (int j = tid; j < N; j += NT) {
            float dec[CHUNK];
#pragma unroll
            for (int s = 0; s < CHUNK; s++) dec[s] = t0 + s < T_ ? decay_of(to_f32(cur[V + s * N + j])) : 1.f;
            float Pj = 1.f, inv = 1.f;
#pragma unroll
            for (int s = CHUNK - 1; s >= 0; s--) {
                const int o = s * N + j;
                fr[o] = to_f32(cur[o]) * inv;
                fk[o] = to_f32(cur[2 * V + o]) * Pj;
                fb[o] = to_f32(cur[4 * V + o]) * Pj;
                Pj *= dec[s];
                inv = fast_rcp(Pj);
                fa[o] = to_f32(cur[3 * V + o]) * inv;
            }
            fend[j] = Pj;
        }
        __syncthreads();
        const T* cdy = cur + 5 * V;

        for (int s = CHUNK - 1; s >= 0; s--) {
            const int t = t0 + s;
            float dyv[R];
#pragma unroll
            for (int rr = 0; rr < R; rr++) dyv[rr] = to_f32(cdy[s * N + l0 + rr * L::G + g]);
            const float4* R4 = reinterpret_cast<const float4*>(fr + s * N) + q;
            const float4* K4 = reinterpret_cast<const float4*>(fk + s * N) + q;
            const float4* B4 = reinterpret_cast<const float4*>(fb + s * N) + q;
            float acc_v[R][2][4], acc_b[R][2][4];
#pragma unroll
            for (int rr = 0; rr < R; rr++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc_v[rr][c / 4][c % 4] = acc_b[rr][c / 4][c % 4] = 0.f;
#pragma unroll
            for (int e4 = 0; e4 < V4; e4++) {
                const float4 rv = R4[e4 * P], kv = K4[e4 * P], bv = B4[e4 * P];
                const float ra[4] = {rv.x, rv.y, rv.z, rv.w}, ka[4] = {kv.x, kv.y, kv.z, kv.w};
                const float ba[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
                for (int rr = 0; rr < R; rr++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        float& x = G[rr][4 * e4 + c];
                        x = fmaf(dyv[rr], ra[c], x);
                        acc_v[rr][e4 & 1][c] = fmaf(x, ka[c], acc_v[rr][e4 & 1][c]);
                        acc_b[rr][e4 & 1][c] = fmaf(x, ba[c], acc_b[rr][e4 & 1][c]);
                    }
            }
            float gbv[R];
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                const float dvv = group_sum<P>(sum8(acc_v[rr]));
                gbv[rr] = group_sum<P>(sum8(acc_b[rr]));
                if (q == rr % P && t < T_) {
                    const int64_t o = at_bthn(b, t, h, l0 + rr * L::G + g, T_, H, N);
                    dv[o] = from_f32<T>(dvv);
                    gb_out[o] = gbv[rr];
                }
            }
            const float4* A4 = reinterpret_cast<const float4*>(fa + s * N) + q;
#pragma unroll
            for (int e4 = 0; e4 < V4; e4++) {
                const float4 av = A4[e4 * P];
                const float aa[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
                for (int rr = 0; rr < R; rr++)
#pragma unroll
                    for (int c = 0; c < 4; c++) G[rr][4 * e4 + c] = fmaf(gbv[rr], aa[c], G[rr][4 * e4 + c]);
            }
        }
#pragma unroll
        for (int rr = 0; rr < R; rr++) scale_line<E, V4, P>(G[rr], fend, q);
    }

#pragma unroll
    for (int rr = 0; rr < R; rr++)
        store_line<E, V4, P>(G[rr], dstate_in + (static_cast<int64_t>(bh) * N + l0 + rr * L::G + g) * N, q);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward pass 2, over columns j of S and G, backward in time. Lines are keys j, elements are values i.
// Plain form per step (S = S_t, Gc = dL/dS_t before this step's y term):
//   Gc += dy r_j;  dr_j = S.dy;  dk_j = Gc.v;  db_j = Gc.sa;  S <- (S - sa b_j - v k_j) / decay_j  (= S_{t-1});
//   dw_j = S.Gc (times d decay/d w);  da_j = S.gb;  Gc <- Gc decay_j + gb a_j.
// Here the decay of a column is one scalar per step, so the rescaling is by scalars: with D_s = prod_{s' > s}
// decay_{s'} (D_15 = 1), S^ = S D_s and G^ = G / D_s, the updates become pure multiply-adds
//   G^ += dy (r_j / D_s);  S^ <- S^ - sa (b_j D_s) - v (k_j D_s);  G^ <- G^ + gb (a_j / D_{s-1})
// and each dot product is rescaled once by a scalar. The exact checkpoint is reloaded at every chunk.

struct ColStep {  // the per-column scalars of one step, read and derived from the raw inputs
    float r, k, a, b, dec, inv_dec, ddec;
};

template <typename T>
__device__ __forceinline__ ColStep col_step(const T* cur, int V, int o, bool pad) {
    ColStep c;
    c.r = to_f32(cur[o]);
    c.k = to_f32(cur[2 * V + o]);
    c.a = to_f32(cur[3 * V + o]);
    c.b = to_f32(cur[4 * V + o]);
    const float sg = sigmoid_f(to_f32(cur[V + o]));
    c.dec = pad ? 1.f : __expf(-DECAY_SCALE * sg);
    c.inv_dec = pad ? 1.f : __expf(DECAY_SCALE * sg);
    c.ddec = pad ? 0.f : -DECAY_SCALE * c.dec * sg * (1.f - sg);  // d decay / d w
    return c;
}

template <typename T, int N>
constexpr size_t cols_smem() {
    return 2 * (7 * CHUNK * N * sizeof(T) + 2 * CHUNK * N * sizeof(float)) + 2 * CHUNK * N * sizeof(float);
}

template <typename T, int N, int P, int R, int LB>
__global__ void __launch_bounds__(Layout<N, P, R, LB>::NT, Layout<N, P, R, LB>::MIN_BLOCKS)
bwd_cols_kernel(const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ a, const T* __restrict__ bb, const T* __restrict__ dy,
                const float* __restrict__ sa_in, const float* __restrict__ gb_in, const float* __restrict__ ckpt,
                const float* __restrict__ dstate_out, T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk,
                T* __restrict__ da, T* __restrict__ db, int B, int T_, int H) {
    using L = Layout<N, P, R, LB>;
    constexpr int E = L::E, V4 = L::V4, NT = L::NT;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int l0 = blockIdx.y * LB;
    const int tid = threadIdx.x, g = tid / P, q = tid % P;
    const int nC = (T_ + CHUNK - 1) / CHUNK;

    // raw[2] = {T[7][CHUNK][N] (r, w, k, a, b, v, dy), float[2][CHUNK][N] (sa, gb)}, then f32[2][CHUNK][N] (dy, v)
    constexpr int V = CHUNK * N;
    constexpr int RAW_BYTES = 7 * V * sizeof(T) + 2 * V * sizeof(float);
    extern __shared__ __align__(16) unsigned char smem[];
    float* fdy = reinterpret_cast<float*>(smem + 2 * RAW_BYTES);
    float* fv = fdy + V;

    int line[R];
#pragma unroll
    for (int rr = 0; rr < R; rr++) line[rr] = l0 + rr * L::G + g;

    float S[R][E], Gc[R][E];
#pragma unroll
    for (int rr = 0; rr < R; rr++)
#pragma unroll
        for (int e4 = 0; e4 < V4; e4++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                Gc[rr][4 * e4 + c] =
                    dstate_out ? dstate_out[(static_cast<int64_t>(bh) * N + L::elem(e4, c, q)) * N + line[rr]] : 0.f;

    auto issue = [&](int ci, int buf) {
        T* dst = reinterpret_cast<T*>(smem + buf * RAW_BYTES);
        float* dstf = reinterpret_cast<float*>(dst + 7 * V);
        ChunkPieces<T, N, NT>(b, ci * CHUNK, T_, H, h, tid).copy_each(dst, V, r, w, k, a, bb, v, dy);
        ChunkPieces<float, N, NT>(b, ci * CHUNK, T_, H, h, tid).copy_each(dstf, V, sa_in, gb_in);
        copy_commit();
    };
    if (nC > 0) issue(nC - 1, 0);

    for (int it = 0; it < nC; it++) {
        const int ci = nC - 1 - it, t0 = ci * CHUNK, buf = it & 1;
        // the exact state after this chunk (loaded before the barrier so its latency overlaps the staging)
        const float* ck = ckpt + (static_cast<int64_t>(bh) * nC + ci) * N * N;
#pragma unroll
        for (int rr = 0; rr < R; rr++) load_line<E, V4, P>(S[rr], ck + line[rr] * N, q);
        if (ci > 0) {
            const float* nk = ck - N * N;
#pragma unroll
            for (int rr = 0; rr < R; rr++)
#pragma unroll
                for (int e4 = 0; e4 < V4; e4 += 8) prefetch_l2(nk + line[rr] * N + L::elem(e4, 0, q));
        }
        copy_wait_all();
        __syncthreads();
        if (ci > 0) issue(ci - 1, buf ^ 1);
        const T* cur = reinterpret_cast<const T*>(smem + buf * RAW_BYTES);
        const float* csa = reinterpret_cast<const float*>(cur + 7 * V);
        const float* cgb = csa + V;
        for (int idx = tid; idx < V; idx += NT) {
            fv[idx] = to_f32(cur[5 * V + idx]);
            fdy[idx] = to_f32(cur[6 * V + idx]);
        }
        __syncthreads();

        float Dl[R], invD[R];  // D_s and 1 / D_s per line
        ColStep nxt[R];
#pragma unroll
        for (int rr = 0; rr < R; rr++) {
            Dl[rr] = invD[rr] = 1.f;
            nxt[rr] = col_step(cur, V, (CHUNK - 1) * N + line[rr], t0 + CHUNK - 1 >= T_);
        }
        for (int s = CHUNK - 1; s >= 0; s--) {
            const int t = t0 + s;
            ColStep now[R];
            float rs[R], bs[R], ks[R], as[R], Dn[R], invDn[R];
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                now[rr] = nxt[rr];
                Dn[rr] = Dl[rr] * now[rr].dec;
                invDn[rr] = invD[rr] * now[rr].inv_dec;
                rs[rr] = now[rr].r * invD[rr];
                bs[rr] = now[rr].b * Dl[rr];
                ks[rr] = now[rr].k * Dl[rr];
                as[rr] = now[rr].a * invDn[rr];
            }
            // next step's scalars now, so their latency hides behind this step's element loop
            const int sp = s > 0 ? s - 1 : 0;
#pragma unroll
            for (int rr = 0; rr < R; rr++) nxt[rr] = col_step(cur, V, sp * N + line[rr], t0 + sp >= T_);

            const float4* DY4 = reinterpret_cast<const float4*>(fdy + s * N) + q;
            const float4* V4p = reinterpret_cast<const float4*>(fv + s * N) + q;
            const float4* SA4 = reinterpret_cast<const float4*>(csa + s * N) + q;
            const float4* GB4 = reinterpret_cast<const float4*>(cgb + s * N) + q;
            float acc[R][5][2];  // dr, dk, db, dw, da; two chains each
#pragma unroll
            for (int rr = 0; rr < R; rr++)
#pragma unroll
                for (int u = 0; u < 10; u++) acc[rr][u / 2][u % 2] = 0.f;
#pragma unroll
            for (int e4 = 0; e4 < V4; e4++) {
                const float4 dyv = DY4[e4 * P], vv = V4p[e4 * P], sav = SA4[e4 * P], gbv = GB4[e4 * P];
                const float dya[4] = {dyv.x, dyv.y, dyv.z, dyv.w}, va[4] = {vv.x, vv.y, vv.z, vv.w};
                const float saa[4] = {sav.x, sav.y, sav.z, sav.w}, gba[4] = {gbv.x, gbv.y, gbv.z, gbv.w};
#pragma unroll
                for (int rr = 0; rr < R; rr++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const int ch = c & 1;
                        float& x = S[rr][4 * e4 + c];
                        float& gc = Gc[rr][4 * e4 + c];
                        gc = fmaf(dya[c], rs[rr], gc);
                        acc[rr][0][ch] = fmaf(x, dya[c], acc[rr][0][ch]);
                        acc[rr][1][ch] = fmaf(gc, va[c], acc[rr][1][ch]);
                        acc[rr][2][ch] = fmaf(gc, saa[c], acc[rr][2][ch]);
                        x = fmaf(-va[c], ks[rr], fmaf(-saa[c], bs[rr], x));
                        acc[rr][3][ch] = fmaf(x, gc, acc[rr][3][ch]);
                        acc[rr][4][ch] = fmaf(x, gba[c], acc[rr][4][ch]);
                        gc = fmaf(gba[c], as[rr], gc);
                    }
            }
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                float out[5];
#pragma unroll
                for (int u = 0; u < 5; u++) out[u] = group_sum<P>(acc[rr][u][0] + acc[rr][u][1]);
                if (q == rr % P && t < T_) {
                    const int64_t o = at_bthn(b, t, h, line[rr], T_, H, N);
                    dr[o] = from_f32<T>(out[0] * invD[rr]);
                    dk[o] = from_f32<T>(out[1] * Dl[rr]);
                    db[o] = from_f32<T>(out[2] * Dl[rr]);
                    dw[o] = from_f32<T>(out[3] * now[rr].inv_dec * now[rr].ddec);
                    da[o] = from_f32<T>(out[4] * invDn[rr]);
                }
                Dl[rr] = Dn[rr];
                invD[rr] = invDn[rr];
            }
        }
#pragma unroll
        for (int rr = 0; rr < R; rr++)
#pragma unroll
            for (int e = 0; e < E; e++) Gc[rr][e] *= Dl[rr];  // G = G^ D_{-1}
    }
}
// ---------------------------------------------------------------------------------------------------------------
// One token for each of B sequences, the state rows of a persistent table [S, H, N, N] picked by slots[B]. One
// block per (sequence, head); a row of S is spread over N/4 lanes (a float4 each) so every state access is a
// coalesced 16-byte load or store, and each thread keeps several rows in flight. An out-of-range slot writes NaN
// to y and leaves the table untouched. With READOUT the block also applies the model's readout of its head's y
// (`rwkv_app.ops.wkv7.wkv7_readout`), in fp32 before y is ever rounded: one kernel launch less per layer.

template <int N>
struct DecodeLayout {
    static constexpr int LPR = N / 4;                         // lanes per row
    static constexpr int NT = (N * LPR < 256) ? N * LPR : 256;
    static constexpr int RPP = NT / LPR;                      // rows per pass of the block
    static constexpr int RPT = N / RPP;                       // rows per thread
    static_assert(LPR <= 32 && (32 % LPR) == 0, "a row must sit inside one warp");
};

template <typename T> struct Vec4;
template <> struct Vec4<float> {
    __device__ static __forceinline__ float4 load(const float* p) { return *reinterpret_cast<const float4*>(p); }
};
template <> struct Vec4<__nv_bfloat16> {
    __device__ static __forceinline__ float4 load(const __nv_bfloat16* p) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&u.x);
        const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&u.y);
        const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
        return make_float4(a.x, a.y, b.x, b.y);
    }
};

template <typename T, int N, bool READOUT>
__global__ void __launch_bounds__(DecodeLayout<N>::NT)
decode_kernel(float* __restrict__ table, const int64_t* __restrict__ slots, const T* __restrict__ r,
              const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ a,
              const T* __restrict__ bb, T* __restrict__ y, int H, int64_t n_slots, Readout<T> ro) {
    using L = DecodeLayout<N>;
    __shared__ float ys[READOUT ? N : 1];  // the head's y, for the GroupNorm
    __shared__ float stats[2];             // its mean and 1 / standard deviation
    const int bh = blockIdx.x, bi = bh / H, h = bh % H;
    const int tid = threadIdx.x, q = tid % L::LPR, g = tid / L::LPR;
    const int64_t in = static_cast<int64_t>(bh) * N;
    const int64_t slot = slots[bi];
    if (slot < 0 || slot >= n_slots) {
        if (tid < N) y[in + tid] = from_f32<T>(__int_as_float(0x7fc00000));
        return;
    }
    float* S0 = table + (slot * H + h) * N * N;

    float4 St[L::RPT];
#pragma unroll
    for (int rr = 0; rr < L::RPT; rr++)
        St[rr] = *reinterpret_cast<const float4*>(S0 + (g + rr * L::RPP) * N + 4 * q);
    const float4 rv = Vec4<T>::load(r + in + 4 * q), wr = Vec4<T>::load(w + in + 4 * q);
    const float4 kv = Vec4<T>::load(k + in + 4 * q), av = Vec4<T>::load(a + in + 4 * q);
    const float4 bv = Vec4<T>::load(bb + in + 4 * q);
    const float4 dv = make_float4(decay_of(wr.x), decay_of(wr.y), decay_of(wr.z), decay_of(wr.w));

#pragma unroll
    for (int rr = 0; rr < L::RPT; rr++) {
        const int i = g + rr * L::RPP;
        float4 s = St[rr];
        const float sa = group_sum<L::LPR>((s.x * av.x + s.y * av.y) + (s.z * av.z + s.w * av.w));
        const float vi = to_f32(v[in + i]);
        s.x = fmaf(s.x, dv.x, fmaf(sa, bv.x, vi * kv.x));
        s.y = fmaf(s.y, dv.y, fmaf(sa, bv.y, vi * kv.y));
        s.z = fmaf(s.z, dv.z, fmaf(sa, bv.z, vi * kv.z));
        s.w = fmaf(s.w, dv.w, fmaf(sa, bv.w, vi * kv.w));
        *reinterpret_cast<float4*>(S0 + i * N + 4 * q) = s;
        const float yy = group_sum<L::LPR>((s.x * rv.x + s.y * rv.y) + (s.z * rv.z + s.w * rv.w));
        if (q == 0) {
            if constexpr (READOUT) ys[i] = yy;
            else y[in + i] = from_f32<T>(yy);
        }
    }
    if constexpr (READOUT) {
        // every line of lanes holds all of r and k: each computes the bonus r.(k * r_k) of the head
        const float4 rk = Vec4<T>::load(ro.r_k + static_cast<int64_t>(h) * N + 4 * q);
        const float bonus = group_sum<L::LPR>((rv.x * kv.x * rk.x + rv.y * kv.y * rk.y) +
                                              (rv.z * kv.z * rk.z + rv.w * kv.w * rk.w));
        __syncthreads();
        if (tid < 32) {  // one warp: mean, then the mean square deviation (two passes, as exact as the data)
            float sum = 0.f;
            for (int i = tid; i < N; i += 32) sum += ys[i];
            const float mean = group_sum<32>(sum) / N;
            float dev = 0.f;
            for (int i = tid; i < N; i += 32) dev += (ys[i] - mean) * (ys[i] - mean);
            dev = group_sum<32>(dev) / N;
            if (tid == 0) {
                stats[0] = mean;
                stats[1] = rsqrtf(dev + ro.eps);
            }
        }
        __syncthreads();
        if (tid < N) {
            const int64_t c = static_cast<int64_t>(h) * N + tid;
            const float z = fmaf((ys[tid] - stats[0]) * stats[1], to_f32(ro.ln_w[c]), to_f32(ro.ln_b[c])) +
                            bonus * to_f32(v[in + tid]);
            y[in + tid] = from_f32<T>(z * to_f32(ro.g[in + tid]));
        }
    }
}

}  // namespace wkv7
