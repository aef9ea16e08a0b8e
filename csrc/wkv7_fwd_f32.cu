// Training forward and prefill kernels for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t forward<float>(const Inputs<float>&, const float*, float*, float*, float*, float*, bool, int,
                                        cudaStream_t);
}  // namespace wkv7
