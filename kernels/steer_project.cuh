// CUDA device code of the fused steer / project / capture op. Header-only, templated on dtypes.
//
// One block handles `rows_per_block` consecutive rows of h. The rows are staged once in shared memory as
// fp32 (h is read once from global memory and, when steered, written once), then:
//   x[r]        = h[r] + table[slot[r]]                    (rows with slot >= 0)
//   x[r]       -= sum_a (x[r]·u_a) u_a                     (ablation, same rows)
//   x[r]       -= (p - clamp(p, lo, hi)) w_c, c in order   (regulation, same rows; one warp per row)
//   h[r]        = round(x[r]);  x[r] = float(h[r]) - center
//   norms[r]    = ‖x[r]‖,  scores[r, k] = x[r]·probes[k]   (one warp per (row, probe) dot, fp32)
//   sums[seg[r]] += h[r], counts[seg[r]] += 1             (atomics: segments may repeat across blocks)
// Probes are staged in shared memory too when they fit beside the rows (small K·d, e.g. decode with few
// vectors); otherwise each warp streams its probe row from global memory (L2-resident across blocks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "../src/steer_project.h"

namespace emovec {
namespace device {

struct Args {
  void* h;
  int64_t n, d, h_row_stride;
  const int64_t* slots;
  const void* table;
  int64_t table_rows;
  const void* ablate;
  int64_t num_ablate;
  const void* probes;
  int64_t num_probes;
  const void* center;
  float* scores;
  float* norms;
  const int64_t* segments;
  float* sums;
  float* counts;
  int64_t num_segments;
  int32_t* errors;  // kSlotOutOfRange / kSegmentOutOfRange ORed in when an index is out of range (or null)
  const void* clamp;
  int64_t num_clamp;
  const float* bounds;
  bool relative_bounds;
  float* corrections;
  int rows_per_block;
  bool probes_in_shared;
};

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename T> __device__ __forceinline__ T store_value(float x);
template <> __device__ __forceinline__ float store_value<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store_value<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_value<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename H, typename W>
__global__ void steer_project_kernel(Args a) {
  extern __shared__ float shared[];
  const int64_t d = a.d;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int rows = static_cast<int>(min(static_cast<int64_t>(a.rows_per_block), a.n - row0));
  float* x = shared;                                   // [rows_per_block, d]
  float* coef = x + a.rows_per_block * d;              // [rows_per_block, num_ablate]
  float* probe_cache = coef + a.rows_per_block * a.num_ablate;  // [num_probes, d] when probes_in_shared
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  H* h = static_cast<H*>(a.h);
  const W* table = static_cast<const W*>(a.table);
  const W* ablate = static_cast<const W*>(a.ablate);
  const W* probes = static_cast<const W*>(a.probes);
  const W* center = static_cast<const W*>(a.center);

  // row r is steered when active(r); an out-of-range slot or segment is reported once, by thread 0
  const W* clamp = static_cast<const W*>(a.clamp);
  auto slot_bad = [&](int64_t i) {
    return a.slots != nullptr && slot_out_of_range(a.slots[i], table != nullptr || a.bounds != nullptr, a.table_rows);
  };
  auto captured = [&](int64_t i) {
    return a.segments != nullptr && a.segments[i] >= 0 && a.segments[i] < a.num_segments;
  };
  if (threadIdx.x == 0 && a.errors != nullptr) {
    for (int r = 0; r < rows; ++r) {
      if (slot_bad(row0 + r)) atomicOr(a.errors, kSlotOutOfRange);
      if (a.segments != nullptr && segment_out_of_range(a.segments[row0 + r], a.num_segments))
        atomicOr(a.errors, kSegmentOutOfRange);
    }
  }

  // 1. load (and steer) the rows
  for (int r = 0; r < rows; ++r) {
    const int64_t i = row0 + r;
    const H* hr = h + i * a.h_row_stride;
    const int64_t slot = a.slots ? a.slots[i] : 0;
    const bool add = table != nullptr && slot >= 0 && !slot_bad(i);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      x[r * d + j] = load_float(hr, j) + (add ? load_float(table, slot * d + j) : 0.0f);
  }
  if (a.probes_in_shared)
    for (int64_t e = threadIdx.x; e < a.num_probes * d; e += blockDim.x) probe_cache[e] = load_float(probes, e);
  __syncthreads();

  // 2. ablation coefficients, one warp per (row, direction)
  if (a.num_ablate > 0) {
    for (int64_t pair = warp; pair < rows * a.num_ablate; pair += warps) {
      const int r = static_cast<int>(pair / a.num_ablate);
      const int64_t q = pair % a.num_ablate;
      float s = 0.0f;
      for (int64_t j = lane; j < d; j += 32) s += x[r * d + j] * load_float(ablate, q * d + j);
      s = warp_sum(s);
      if (lane == 0) coef[r * a.num_ablate + q] = s;
    }
    __syncthreads();
  }

  // 3. subtract the ablation in shared memory
  const bool edits = table != nullptr || a.num_ablate > 0 || a.num_clamp > 0;
  auto active_row = [&](int64_t i) { return a.slots == nullptr || (a.slots[i] >= 0 && !slot_bad(i)); };
  if (a.num_ablate > 0) {
    for (int r = 0; r < rows; ++r) {
      if (!active_row(row0 + r)) continue;
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        float v = x[r * d + j];
        for (int64_t q = 0; q < a.num_ablate; ++q) v -= coef[r * a.num_ablate + q] * load_float(ablate, q * d + j);
        x[r * d + j] = v;
      }
    }
    __syncthreads();
  }

  // 4. regulation: one warp per row, the directions one after the other
  if (a.num_clamp > 0) {
    for (int r = warp; r < rows; r += warps) {
      const int64_t i = row0 + r;
      float* corr = a.corrections ? a.corrections + i * a.num_clamp : nullptr;
      if (!active_row(i)) {
        if (corr) for (int64_t c = lane; c < a.num_clamp; c += 32) corr[c] = 0.0f;
        continue;
      }
      const float* bounds = a.bounds + (a.slots ? a.slots[i] : 0) * a.num_clamp * 2;
      float* xr = x + r * d;
      float n2 = 0.0f;
      if (a.relative_bounds) {
        for (int64_t j = lane; j < d; j += 32) {
          const float y = center ? xr[j] - load_float(center, j) : xr[j];
          n2 += y * y;
        }
        n2 = warp_sum(n2);
      }
      for (int64_t c = 0; c < a.num_clamp; ++c) {
        float p = 0.0f, uu = 0.0f;
        for (int64_t j = lane; j < d; j += 32) {
          const float u = load_float(clamp, c * d + j);
          p += (center ? xr[j] - load_float(center, j) : xr[j]) * u;
          uu += u * u;
        }
        p = warp_sum(p);
        uu = warp_sum(uu);
        float lo = bounds[c * 2], hi = bounds[c * 2 + 1];
        if (a.relative_bounds) {
          lo = cosine_bound(lo, n2 - p * p);
          hi = cosine_bound(hi, n2 - p * p);
        }
        const float delta = p - fminf(fmaxf(p, lo), hi);
        if (corr && lane == 0) corr[c] = delta;
        if (delta == 0.0f) continue;  // within bounds: the row is left bit-identical
        for (int64_t j = lane; j < d; j += 32) xr[j] -= delta * load_float(clamp, c * d + j);
        __syncwarp();
        n2 += delta * delta * uu - 2.0f * delta * p;
      }
    }
    __syncthreads();
  }

  // 5. store back in h's dtype, capture, keep exactly what was stored (minus center) for projection
  for (int r = 0; r < rows; ++r) {
    const int64_t i = row0 + r;
    const bool active = active_row(i);
    const bool capture = captured(i);
    H* hr = h + i * a.h_row_stride;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float v = x[r * d + j];
      if (edits && active) {
        const H stored = store_value<H>(v);
        hr[j] = stored;
        v = load_float(&stored, 0);
      }
      if (capture) atomicAdd(a.sums + a.segments[i] * d + j, v);
      x[r * d + j] = center ? v - load_float(center, j) : v;
    }
    if (threadIdx.x == 0 && capture) atomicAdd(a.counts + a.segments[i], 1.0f);
  }
  __syncthreads();

  // 6. norms and scores, one warp per dot
  if (a.norms != nullptr) {
    for (int r = warp; r < rows; r += warps) {
      float s = 0.0f;
      for (int64_t j = lane; j < d; j += 32) s += x[r * d + j] * x[r * d + j];
      s = warp_sum(s);
      if (lane == 0) a.norms[row0 + r] = sqrtf(s);
    }
  }
  if (a.scores != nullptr) {
    const int64_t K = a.num_probes;
    for (int64_t pair = warp; pair < rows * K; pair += warps) {
      const int r = static_cast<int>(pair / K);
      const int64_t k = pair % K;
      float s = 0.0f;
      if (a.probes_in_shared) {
        for (int64_t j = lane; j < d; j += 32) s += x[r * d + j] * probe_cache[k * d + j];
      } else {
        for (int64_t j = lane; j < d; j += 32) s += x[r * d + j] * load_float(probes, k * d + j);
      }
      s = warp_sum(s);
      if (lane == 0) a.scores[(row0 + r) * K + k] = s;
    }
  }
}

}  // namespace device
}  // namespace emovec
