// Backward pass 1 (rows of dL/dS) for __nv_bfloat16 inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
using E = __nv_bfloat16;
template cudaError_t backward_rows<E>(const Inputs<E>&, const E*, const float*, E*, float*, float*, int, cudaStream_t);
}  // namespace wkv7
