// Backward pass 2 (columns of S and dL/dS) for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
using E = float;
template cudaError_t backward_cols<E>(const Inputs<E>&, const E*, const float*, const float*, const float*,
                                      const float*, E*, E*, E*, E*, E*, int, cudaStream_t);
}  // namespace wkv7
