// Host launcher of the CUDA kernel: picks the block shape and shared memory, dispatches on dtypes,
// launches once on the caller's stream and turns CUDA errors into exceptions with the CUDA error text.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../kernels/steer_project.cuh"
#include "steer_project.h"

#ifndef EMOVEC_CUDA_ARCHS
#define EMOVEC_CUDA_ARCHS ""
#endif

namespace emovec {
namespace {

constexpr int kThreads = 256;
constexpr size_t kDefaultShared = 48 * 1024;

void throw_on_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("emovec CUDA ") + what + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
}

template <typename H, typename W>
void launch(const SteerProjectArgs& a, cudaStream_t stream) {
  device::Args k{};
  k.h = a.h; k.n = a.n; k.d = a.d; k.h_row_stride = a.h_row_stride;
  k.slots = a.slots; k.table = a.table; k.table_rows = a.table_rows; k.ablate = a.ablate; k.num_ablate = a.num_ablate;
  k.probes = a.probes; k.num_probes = a.num_probes; k.center = a.center;
  k.scores = a.scores; k.norms = a.norms;
  k.segments = a.segments; k.sums = a.sums; k.counts = a.counts;
  k.num_segments = a.num_segments; k.errors = a.errors;
  k.clamp = a.clamp; k.num_clamp = a.num_clamp; k.bounds = a.bounds; k.relative_bounds = a.relative_bounds;
  k.corrections = a.corrections;

  int dev = 0, max_shared = 0;
  throw_on_error(cudaGetDevice(&dev), "cudaGetDevice");
  throw_on_error(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "attribute query");
  // rows per block: as many as fit in ~40 KB of fp32 staging (1..8), so several blocks share an SM
  const int64_t row_bytes = a.d * static_cast<int64_t>(sizeof(float));
  k.rows_per_block = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, (40 * 1024) / row_bytes)));
  size_t shared = static_cast<size_t>(k.rows_per_block) * (row_bytes + a.num_ablate * sizeof(float));
  const size_t probe_bytes = static_cast<size_t>(a.num_probes) * row_bytes;
  k.probes_in_shared = a.scores != nullptr && shared + probe_bytes <= kDefaultShared;
  if (k.probes_in_shared) shared += probe_bytes;
  if (shared > static_cast<size_t>(max_shared))
    throw std::runtime_error("emovec CUDA: hidden size " + std::to_string(a.d) + " needs " + std::to_string(shared) +
                             " bytes of shared memory per block, the device allows " + std::to_string(max_shared));
  if (shared > kDefaultShared)
    throw_on_error(cudaFuncSetAttribute(device::steer_project_kernel<H, W>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
                   "cudaFuncSetAttribute");
  const int64_t blocks = (a.n + k.rows_per_block - 1) / k.rows_per_block;
  device::steer_project_kernel<H, W><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(k);
  throw_on_error(cudaGetLastError(), "kernel launch");
}

template <typename H>
void dispatch_weights(const SteerProjectArgs& a, cudaStream_t stream) {
  if (a.w_dtype == kFloat32) launch<H, float>(a, stream);
  else launch<H, H>(a, stream);
}

}  // namespace

void steer_project_cuda(const SteerProjectArgs& a, std::intptr_t stream_handle) {
  check_args(a);
  if (a.n == 0) return;
  int count = 0;
  throw_on_error(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.h_dtype) {
    case kFloat32: launch<float, float>(a, stream); break;
    case kFloat16: dispatch_weights<__half>(a, stream); break;
    case kBFloat16: dispatch_weights<__nv_bfloat16>(a, stream); break;
    default: throw std::invalid_argument("emovec._C.steer_project: unknown h dtype code");
  }
}

bool cuda_compiled() { return true; }
std::string cuda_architectures() { return EMOVEC_CUDA_ARCHS; }
int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace emovec
