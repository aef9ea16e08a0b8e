// Backward pass 2 (columns of S and dL/dS) for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t backward_cols<float>(const Inputs<float>&, const float*, const float*, const float*, const float*,
                                              const float*, float*, float*, float*, float*, float*, int, cudaStream_t);
}  // namespace wkv7
