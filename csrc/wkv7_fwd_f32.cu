// Training forward and prefill kernels for float inputs.
#include "wkv7_launch.cuh"

namespace wkv7 {
using E = float;
template cudaError_t forward<E>(const Inputs<E>&, const float*, float*, E*, float*, float*, bool, int, cudaStream_t);
}  // namespace wkv7
