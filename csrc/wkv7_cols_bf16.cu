// Backward pass 2 (columns of S and dL/dS) for __nv_bfloat16 inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
using E = __nv_bfloat16;
template cudaError_t backward_cols<E>(const Inputs<E>&, const E*, const float*, const float*, const float*,
                                      const float*, E*, E*, E*, E*, E*, int, cudaStream_t);
}  // namespace wkv7
