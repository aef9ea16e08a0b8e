// Training forward and prefill kernels for __nv_bfloat16 inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
template cudaError_t forward<__nv_bfloat16>(const Inputs<__nv_bfloat16>&, const float*, float*, __nv_bfloat16*, float*, float*, bool, int,
                                        cudaStream_t);
}  // namespace wkv7
