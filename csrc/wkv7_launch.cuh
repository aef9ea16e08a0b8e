// Launch templates for the kernels in wkv7_kernels.cuh. Each wkv7_<pass>_<dtype>.cu instantiates one of them for one
// element type, so nvcc compiles the passes in parallel.
#pragma once

#include "wkv7.h"
#include "wkv7_kernels.cuh"

namespace wkv7 {

template <typename K>
inline cudaError_t allow_smem(K kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int N, int P, int R, int LB>
cudaError_t run_forward(const Inputs<T>& x, const float* s_in, float* s_out, T* y, float* sa, float* ckpt, bool train,
                        cudaStream_t st) {
    constexpr size_t smem = line_smem<T, N>();
    const dim3 grid(x.B * x.H, N / LB);
    constexpr int nt = Layout<N, P, R, LB>::NT;
    if (train) {
        auto kern = fwd_kernel<T, N, P, R, LB, true>;
        cudaError_t e = allow_smem(kern, smem);
        if (e != cudaSuccess) return e;
        kern<<<grid, nt, smem, st>>>(x.r, x.w, x.k, x.v, x.a, x.b, s_in, s_out, y, sa, ckpt, x.B, x.T, x.H);
    } else {
        auto kern = fwd_kernel<T, N, P, R, LB, false>;
        cudaError_t e = allow_smem(kern, smem);
        if (e != cudaSuccess) return e;
        kern<<<grid, nt, smem, st>>>(x.r, x.w, x.k, x.v, x.a, x.b, s_in, s_out, y, nullptr, nullptr, x.B, x.T, x.H);
    }
    return cudaGetLastError();
}

template <typename T, int N, int P, int R, int LB>
cudaError_t run_rows(const Inputs<T>& x, const T* dy, const float* ds_out, T* dv, float* gb, float* ds_in,
                     cudaStream_t st) {
    constexpr size_t smem = line_smem<T, N>();
    auto kern = bwd_rows_kernel<T, N, P, R, LB>;
    cudaError_t e = allow_smem(kern, smem);
    if (e != cudaSuccess) return e;
    kern<<<dim3(x.B * x.H, N / LB), Layout<N, P, R, LB>::NT, smem, st>>>(x.r, x.w, x.k, x.a, x.b, dy, ds_out, dv,
                                                                          gb, ds_in, x.B, x.T, x.H);
    return cudaGetLastError();
}

template <typename T, int N, int P, int R, int LB>
cudaError_t run_cols(const Inputs<T>& x, const T* dy, const float* sa, const float* gb, const float* ckpt,
                     const float* ds_out, T* dr, T* dw, T* dk, T* da, T* db, cudaStream_t st) {
    constexpr size_t smem = cols_smem<T, N>();
    auto kern = bwd_cols_kernel<T, N, P, R, LB>;
    cudaError_t e = allow_smem(kern, smem);
    if (e != cudaSuccess) return e;
    kern<<<dim3(x.B * x.H, N / LB), Layout<N, P, R, LB>::NT, smem, st>>>(
        x.r, x.w, x.k, x.v, x.a, x.b, dy, sa, gb, ckpt, ds_out, dr, dw, dk, da, db, x.B, x.T, x.H);
    return cudaGetLastError();
}

#define WKV7_CASE_FWD(id, P, R, LB) \
    case id: return run_forward<T, N_, P, R, LB>(x, s_in, s_out, y, sa, ckpt, train, st);
#define WKV7_CASE_ROWS(id, P, R, LB) case id: return run_rows<T, N_, P, R, LB>(x, dy, ds_out, dv, gb, ds_in, st);
#define WKV7_CASE_COLS(id, P, R, LB) \
    case id: return run_cols<T, N_, P, R, LB>(x, dy, sa, gb, ckpt, ds_out, dr, dw, dk, da, db, st);

// switch (config) over the list of head size N_, inside a scope where N_ is a constexpr int
#define WKV7_BY_HEAD_SIZE(CASE)                                                            \
    switch (x.N) {                                                                          \
        case 32: { constexpr int N_ = 32; switch (config) { WKV7_CONFIGS_32(CASE) } break; }   \
        case 64: { constexpr int N_ = 64; switch (config) { WKV7_CONFIGS_64(CASE) } break; }   \
        case 128: { constexpr int N_ = 128; switch (config) { WKV7_CONFIGS_128(CASE) } break; } \
    }                                                                                       \
    return cudaErrorInvalidValue;

template <typename T>
cudaError_t forward(const Inputs<T>& x, const float* s_in, float* s_out, T* y, float* sa, float* ckpt, bool train,
                    int config, cudaStream_t st) {
    WKV7_BY_HEAD_SIZE(WKV7_CASE_FWD)
}

template <typename T>
cudaError_t backward_rows(const Inputs<T>& x, const T* dy, const float* ds_out, T* dv, float* gb, float* ds_in,
                          int config, cudaStream_t st) {
    WKV7_BY_HEAD_SIZE(WKV7_CASE_ROWS)
}

template <typename T>
cudaError_t backward_cols(const Inputs<T>& x, const T* dy, const float* sa, const float* gb, const float* ckpt,
                          const float* ds_out, T* dr, T* dw, T* dk, T* da, T* db, int config, cudaStream_t st) {
    WKV7_BY_HEAD_SIZE(WKV7_CASE_COLS)
}

template <typename T, int N>
cudaError_t run_decode(float* table, int64_t n_slots, const int64_t* slots, const T* r, const T* w, const T* k,
                       const T* v, const T* a, const T* b, T* y, int B, int H, const Readout<T>& ro,
                       cudaStream_t st) {
    // (the readout's two barriers keep it at the plain kernel's 48 registers: one barrier with every writing warp
    // taking the statistics itself needed 52, one resident block less per SM, and ran 10% slower at 7.2B batch 128)
    if (ro.g)
        decode_kernel<T, N, true><<<B * H, DecodeLayout<N>::NT, 0, st>>>(table, slots, r, w, k, v, a, b, y, H,
                                                                         n_slots, ro);
    else
        decode_kernel<T, N, false><<<B * H, DecodeLayout<N>::NT, 0, st>>>(table, slots, r, w, k, v, a, b, y, H,
                                                                          n_slots, ro);
    return cudaGetLastError();
}

template <typename T>
cudaError_t decode(float* table, int64_t n_slots, const int64_t* slots, const T* r, const T* w, const T* k,
                   const T* v, const T* a, const T* b, T* y, int B, int H, int N, const Readout<T>& ro,
                   cudaStream_t st) {
    switch (N) {
        case 32: return run_decode<T, 32>(table, n_slots, slots, r, w, k, v, a, b, y, B, H, ro, st);
        case 64: return run_decode<T, 64>(table, n_slots, slots, r, w, k, v, a, b, y, B, H, ro, st);
        case 128: return run_decode<T, 128>(table, n_slots, slots, r, w, k, v, a, b, y, B, H, ro, st);
    }
    return cudaErrorInvalidValue;
}

}  // namespace wkv7
