// Backward pass 1 (rows of dL/dS) for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
using E = float;
template cudaError_t backward_rows<E>(const Inputs<E>&, const E*, const float*, E*, float*, float*, int, cudaStream_t);
}  // namespace wkv7
