// Host interface of the WKV-7 kernels: plain pointers and shapes, no torch types, so the bindings (wkv7_ops.cpp,
// built by the host compiler) and the kernels (*.cu, built by nvcc) meet here. Every launcher returns the CUDA
// error of its launch (cudaSuccess when fine). Tensors are contiguous: inputs [B, T, H, N] (decode: [B, H, N]),
// states [B, H, N(value i), N(key j)] fp32. T is bf16 (__nv_bfloat16) or float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace wkv7 {

constexpr int kChunk = 16;  // steps staged together in shared memory = the checkpoint interval of the forward

// The three line recurrences (see wkv7_kernels.cuh); prefill uses the forward's configurations.
enum class Pass { Forward = 0, Rows = 1, Cols = 2 };

// The configurations compiled per head size: X(id, P, R, LB) = P lanes per line, R lines per thread, LB lines
// per block, ordered by threads per head (N * P / R). choose_config (wkv7_config.cpp) picks one per pass.
#define WKV7_CONFIGS_32(X) X(0, 1, 1, 32) X(1, 4, 1, 32)
#define WKV7_CONFIGS_64(X) X(0, 1, 1, 64) X(1, 2, 2, 64) X(2, 2, 1, 64) X(3, 4, 1, 64) X(4, 8, 1, 32)
#define WKV7_CONFIGS_128(X) X(0, 2, 1, 128) X(1, 8, 1, 64)

// One launch configuration.
struct Config {
    int P, R, LB;
};

bool head_size_supported(int N);
int num_configs(int N);                 // valid config ids are 0 .. num_configs(N)-1
Config config_of(int N, int id);
// The config a pass runs with for B*H heads of size N on a GPU with `sms` multiprocessors.
int choose_config(Pass pass, int heads, int N, int sms);

template <typename Elem>
struct Inputs {  // r, w (raw decay pre-activation), k, v, a, b: [B, T, H, N]
    const Elem *r, *w, *k, *v, *a, *b;
    int B, T, H, N;
};

// Training forward: y [B,T,H,N], state_out [B,H,N,N], sa [B,T,H,N] fp32, ckpt [B,H,ceil(T/16),N,N] fp32.
// Prefill (train=false): sa and ckpt unused; state_in may equal state_out (in place).
template <typename T>
cudaError_t forward(const Inputs<T>& x, const float* state_in, float* state_out, T* y, float* sa, float* ckpt,
                    bool train, int config, cudaStream_t stream);

// Backward, pass 1 (rows of dL/dS): dv, gb = (dL/dS_t) b_t into the [B,T,H,N] fp32 scratch, and dstate_in
// [B,H,N,N]. dstate_out may be null (zero).
template <typename T>
cudaError_t backward_rows(const Inputs<T>& x, const T* dy, const float* dstate_out, T* dv, float* gb,
                          float* dstate_in, int config, cudaStream_t stream);

// Backward, pass 2 (columns): dr, dw (with respect to the raw pre-activation), dk, da, db from the forward's sa and
// checkpoints and pass 1's gb.
template <typename T>
cudaError_t backward_cols(const Inputs<T>& x, const T* dy, const float* sa, const float* gb, const float* ckpt,
                          const float* dstate_out, T* dr, T* dw, T* dk, T* da, T* db, int config,
                          cudaStream_t stream);

// A block's readout of the decode step's y, fused into the decode kernel when g is set:
// y <- (GroupNorm of each head (ln_w, ln_b [H*N], eps) + (sum over the head of r * k * r_k [H, N]) * v) * g [B,H,N].
template <typename T>
struct Readout {
    const T* g = nullptr;
    const T* ln_w = nullptr;
    const T* ln_b = nullptr;
    const T* r_k = nullptr;
    float eps = 0.f;
};

// Decode: r.. [B,H,N]; table [n_slots,H,N,N] fp32 updated in place at rows slots[B]; y [B,H,N] (read out when
// readout.g is set).
template <typename T>
cudaError_t decode(float* table, int64_t n_slots, const int64_t* slots, const T* r, const T* w, const T* k,
                   const T* v, const T* a, const T* b, T* y, int B, int H, int N, const Readout<T>& readout,
                   cudaStream_t stream);

}  // namespace wkv7
