// Backward pass 1 (rows of dL/dS) for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t backward_rows<float>(const Inputs<float>&, const float*, const float*, float*, float*, float*, int,
                                              cudaStream_t);
}  // namespace wkv7
