// Host launcher of the CUDA kernels: picks block shapes and shared memory, dispatches on dtypes, launches on the
// caller's stream (the edit kernel when the call edits, then the projection kernel when it scores, takes norms or
// captures; see kernels/steer_project.cuh) and turns CUDA errors into exceptions with the CUDA error text.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>

#include "../kernels/steer_project.cuh"
#include "steer_project.h"

#ifndef EMOVEC_CUDA_ARCHS
#define EMOVEC_CUDA_ARCHS ""
#endif

namespace emovec {
namespace {

constexpr int kEditThreads = 256;
constexpr size_t kDefaultShared = 48 * 1024;
constexpr int kWideTile = 4;  // probes per projection block when the grid fills the device anyway

void throw_on_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("emovec CUDA ") + what + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename H, typename W>
void launch_edits(device::Args k, const SteerProjectArgs& a, int sms, int max_shared, cudaStream_t stream) {
  // rows per block: one while that keeps every SM busy (decode), up to 8 as fit in ~40 KB of fp32 staging (several
  // blocks per SM) when there are more rows than SMs
  const int64_t row_bytes = a.d * static_cast<int64_t>(sizeof(float));
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(8, (40 * 1024) / row_bytes));
  k.rows_per_block = static_cast<int>(std::min<int64_t>(fit, (a.n + sms - 1) / sms));
  const size_t shared = static_cast<size_t>(k.rows_per_block) * (row_bytes + a.num_ablate * sizeof(float));
  if (shared > static_cast<size_t>(max_shared))
    throw std::runtime_error("emovec CUDA: hidden size " + std::to_string(a.d) + " needs " + std::to_string(shared) +
                             " bytes of shared memory per block, the device allows " + std::to_string(max_shared));
  if (shared > kDefaultShared)
    throw_on_error(cudaFuncSetAttribute(device::edit_rows_kernel<H, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)),
                   "cudaFuncSetAttribute");
  const int64_t blocks = (a.n + k.rows_per_block - 1) / k.rows_per_block;
  if (blocks > INT_MAX)
    throw std::runtime_error("emovec CUDA: " + std::to_string(a.n) + " rows need " + std::to_string(blocks) +
                             " edit blocks, more than a grid holds; use the triton or torch backend");
  device::edit_rows_kernel<H, W><<<static_cast<unsigned>(blocks), kEditThreads, shared, stream>>>(k);
  throw_on_error(cudaGetLastError(), "edit kernel launch");
}

template <typename H, typename W>
void launch_projection(device::Args k, const SteerProjectArgs& a, int sms, cudaStream_t stream) {
  const int64_t groups = (a.n + device::kRows - 1) / device::kRows;
  const int64_t wide_tiles = (a.num_probes + kWideTile - 1) / kWideTile;
  // Every probe tile re-reads its rows from L2: N x d x K / KT bytes. One probe per block (KT = 1) fills the device at
  // N = 1 (K = 171: 171 blocks, not 43), but at N = 16 it re-reads h 171 times (22 MB of L2 traffic for 1.4 MB of
  // probes); four per block cut that 4x once the wide grid still covers half the SMs (2 row groups at K = 171).
  // A model, not a measurement: benchmarks/gpu_check.sh times N = 1..16 on a device.
  const bool wide = a.scores != nullptr && 2 * groups * wide_tiles >= sms;
  k.k_tiles = a.scores == nullptr ? 1 : (wide ? wide_tiles : a.num_probes);
  const int64_t blocks = groups * k.k_tiles;
  if (blocks > INT_MAX)
    throw std::runtime_error("emovec CUDA: " + std::to_string(a.n) + " rows x " + std::to_string(a.num_probes) +
                             " probes need more blocks than a grid holds; use the triton or torch backend");
  k.vector_loads = aligned16(a.h) && (a.n <= 1 || (a.h_row_stride * sizeof(H)) % 16 == 0) &&
                   (a.probes == nullptr || (aligned16(a.probes) && (a.d * sizeof(W)) % 16 == 0)) &&
                   (a.center == nullptr || aligned16(a.center));
  // one thread per 8 columns, in whole warps, at most 256 threads (d = 4096: 2 chunks per thread)
  const int64_t chunks = (a.d + device::kChunk - 1) / device::kChunk;
  const int threads = static_cast<int>(std::min<int64_t>(device::kMaxWarps * 32, (chunks + 31) / 32 * 32));
  if (wide)
    device::project_rows_kernel<H, W, kWideTile><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(k);
  else
    device::project_rows_kernel<H, W, 1><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(k);
  throw_on_error(cudaGetLastError(), "projection kernel launch");
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

  int dev = 0, max_shared = 0, sms = 0;
  throw_on_error(cudaGetDevice(&dev), "cudaGetDevice");
  throw_on_error(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "attribute query");
  throw_on_error(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "attribute query");
  if (a.table != nullptr || a.num_ablate > 0 || a.num_clamp > 0) launch_edits<H, W>(k, a, sms, max_shared, stream);
  if (a.scores != nullptr || a.norms != nullptr || a.sums != nullptr) launch_projection<H, W>(k, a, sms, stream);
}

template <typename H>
void dispatch_weights(const SteerProjectArgs& a, cudaStream_t stream) {
  if (a.w_dtype == kFloat32) launch<H, float>(a, stream);
  else launch<H, H>(a, stream);
}

}  // namespace

void steer_project_cuda(const SteerProjectArgs& a, std::intptr_t stream_handle) {
  check_args(a);
  if (a.scores_row_stride != 0 || a.norms_stride != 0)
    throw std::invalid_argument("emovec._C.steer_project: strided scores / norms are a CPU-only option");
  if (a.h_dtype == kFloat32 && a.w_dtype != kFloat32)
    throw std::invalid_argument("emovec._C.steer_project: bf16 probes for fp32 h are a CPU-only option");
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
