// Backward pass 2 (columns of S and dL/dS) for __nv_bfloat16 inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t backward_cols<__nv_bfloat16>(const Inputs<__nv_bfloat16>&, const __nv_bfloat16*, const float*, const float*, const float*,
                                              const float*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, int, cudaStream_t);
}  // namespace wkv7
