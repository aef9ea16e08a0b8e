// Backward pass 1 (rows of dL/dS) for __nv_bfloat16 inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t backward_rows<__nv_bfloat16>(const Inputs<__nv_bfloat16>&, const __nv_bfloat16*, const float*, __nv_bfloat16*, float*, float*, int,
                                              cudaStream_t);
}  // namespace wkv7
