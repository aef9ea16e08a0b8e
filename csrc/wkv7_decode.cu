// The batched one-token decode step, for bf16 and float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t decode<__nv_bfloat16>(float*, int64_t, const int64_t*, const __nv_bfloat16*,
                                           const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
                                           const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, int, int, int,
                                           const Readout<__nv_bfloat16>&, cudaStream_t);
template cudaError_t decode<float>(float*, int64_t, const int64_t*, const float*, const float*, const float*,
                                   const float*, const float*, const float*, float*, int, int, int,
                                   const Readout<float>&, cudaStream_t);
}  // namespace wkv7
