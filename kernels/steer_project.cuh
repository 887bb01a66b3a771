// CUDA device code of the fused steer / project / capture op. Header-only, templated on dtypes.
//
// Two kernels, launched one after the other on the caller's stream by src/cuda_launch.cu:
//
// edit_rows_kernel (only when the call steers, ablates or regulates): `rows_per_block` rows per block, staged in
// shared memory as fp32 (h is read once and written once):
//   x[r]  = h[r] + table[slot[r]]                    (rows with slot >= 0)
//   x[r] -= sum_a (x[r]·u_a) u_a                     (ablation, same rows)
//   x[r] -= (p - clamp(p, lo, hi)) w_c, c in order   (regulation, same rows; one warp per row)
//   h[r]  = round(x[r])
// Every projection block reads every row of its row group, so the edits must be complete before any block
// projects: two launches, ordered by the stream. One launch with a grid-wide barrier would need a cooperative
// launch (all blocks resident at once) to save one ~3 µs launch, and only on calls that edit.
//
// project_rows_kernel (scores, norms, capture): a grid of (probe tile x row group) blocks, KT probes x kRows rows
// each. At N = 1 the K probes spread over K / KT blocks (K = 171, KT = 1: 171 blocks, every SM of an H100 busy), and
// each probe is read from memory once per row group: once per call for N <= kRows, from L2 after that; the rows come
// from L2 too. Each thread walks d in chunks of 8 elements (16-byte loads when every row and pointer is 16-byte
// aligned, scalar loads otherwise and for the tail of d):
//   scores[r, k] = (h[r] - center)·probes[k]   fp32; the center is subtracted in fp32 before the product, as the
//                                               CPU kernel and Triton's small-N path do (Triton's tensor-core prefill
//                                               subtracts center·probe after it; both meet the tests' error rule)
// then reduces across the block (warp shuffles, then shared memory). The blocks of probe tile 0 also compute
//   norms[r] = ‖h[r] - center‖   and capture   sums[seg[r]] += h[r], counts[seg[r]] += 1
// where consecutive rows of one segment (extraction: a segment spans many rows) are summed in registers first, so
// a block issues one atomicAdd (relaxed: only the sum matters) per run of rows, not one per row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "../src/steer_project.h"

namespace emovec {
namespace device {

constexpr int kRows = 8;       // rows per projection block
constexpr int kChunk = 8;      // elements per thread and step: one 16-byte load of fp16 / bf16, two of fp32
constexpr int kMaxWarps = 8;   // projection blocks have at most 256 threads

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
  int rows_per_block;  // edit_rows_kernel
  int64_t k_tiles;     // project_rows_kernel: probe tiles (1 without scores); block b is tile b % k_tiles
  bool vector_loads;   // project_rows_kernel: h's rows, the probes and the center are 16-byte aligned
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

__device__ __forceinline__ void unpack(const uint4& v, const __half*, float (&out)[kChunk]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int e = 0; e < kChunk / 2; ++e) {
    const float2 f = __half22float2(pairs[e]);
    out[2 * e] = f.x;
    out[2 * e + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& v, const __nv_bfloat16*, float (&out)[kChunk]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int e = 0; e < kChunk / 2; ++e) {
    const float2 f = __bfloat1622float2(pairs[e]);
    out[2 * e] = f.x;
    out[2 * e + 1] = f.y;
  }
}

// kChunk consecutive elements from p as fp32; elements at and past `count` read as 0. `vector`: p is 16-byte aligned.
// Read-only cache loads: nothing writes these arrays while project_rows_kernel runs.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int count, bool vector, float (&out)[kChunk]) {
  if (vector && count == kChunk) {
    if constexpr (std::is_same<T, float>::value) {
      const float4 lo = __ldg(reinterpret_cast<const float4*>(p)), hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
      out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
      out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
    } else {
      unpack(__ldg(reinterpret_cast<const uint4*>(p)), p, out);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) out[e] = e < count ? load_float(p, e) : 0.0f;
  }
}

template <typename H, typename W>
__global__ void edit_rows_kernel(Args a) {
  extern __shared__ float shared[];
  const int64_t d = a.d;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int rows = static_cast<int>(min(static_cast<int64_t>(a.rows_per_block), a.n - row0));
  float* x = shared;                       // [rows_per_block, d]
  float* coef = x + a.rows_per_block * d;  // [rows_per_block, num_ablate]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  H* h = static_cast<H*>(a.h);
  const W* table = static_cast<const W*>(a.table);
  const W* ablate = static_cast<const W*>(a.ablate);
  const W* center = static_cast<const W*>(a.center);
  const W* clamp = static_cast<const W*>(a.clamp);

  // row r is edited when active_row(r); an out-of-range slot is reported once per block, by thread 0
  auto slot_bad = [&](int64_t i) {
    return a.slots != nullptr && slot_out_of_range(a.slots[i], table != nullptr || a.bounds != nullptr, a.table_rows);
  };
  auto active_row = [&](int64_t i) { return a.slots == nullptr || (a.slots[i] >= 0 && !slot_bad(i)); };
  if (threadIdx.x == 0 && a.errors != nullptr) {
    for (int r = 0; r < rows; ++r)
      if (slot_bad(row0 + r)) atomicOr(a.errors, kSlotOutOfRange);
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

  // 5. store the edited rows back in h's dtype (project_rows_kernel then reads them exactly as stored)
  for (int r = 0; r < rows; ++r) {
    const int64_t i = row0 + r;
    if (!active_row(i)) continue;
    H* hr = h + i * a.h_row_stride;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) hr[j] = store_value<H>(x[r * d + j]);
  }
}

// Adds a run of captured rows (one segment, this thread's chunk of columns) into sums, once.
__device__ __forceinline__ void flush_run(float* sums, int64_t segment, int64_t d, int64_t j, int count,
                                          const float (&run)[kChunk]) {
  if (segment < 0) return;
#pragma unroll
  for (int e = 0; e < kChunk; ++e)
    if (e < count) atomicAdd(sums + segment * d + j + e, run[e]);
}

template <typename H, typename W, int KT>
__global__ void __launch_bounds__(kMaxWarps * 32) project_rows_kernel(Args a) {
  constexpr int kOut = kRows * (KT + 1);  // per row: KT dots, then the squared norm
  __shared__ float partial[kMaxWarps][kOut];
  __shared__ int64_t segment_of[kRows];  // capture: each row's segment, -1 = not captured
  const int64_t d = a.d, K = a.num_probes;
  const int64_t tile = blockIdx.x % a.k_tiles, group = blockIdx.x / a.k_tiles;
  const int64_t row0 = group * kRows, k0 = tile * KT;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), a.n - row0));
  const int probes_here = a.scores != nullptr ? static_cast<int>(min(static_cast<int64_t>(KT), K - k0)) : 0;
  const bool norms = tile == 0 && a.norms != nullptr;
  const bool capture = tile == 0 && a.sums != nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const H* __restrict__ h = static_cast<const H*>(a.h);
  const W* __restrict__ probes = static_cast<const W*>(a.probes);
  const W* __restrict__ center = static_cast<const W*>(a.center);

  if (capture && threadIdx.x < kRows) {
    int64_t segment = -1;
    if (static_cast<int>(threadIdx.x) < rows) {
      segment = a.segments[row0 + threadIdx.x];
      if (segment_out_of_range(segment, a.num_segments)) {  // not captured, reported
        if (a.errors != nullptr) atomicOr(a.errors, kSegmentOutOfRange);
        segment = -1;
      }
    }
    segment_of[threadIdx.x] = segment;
  }
  __syncthreads();

  float acc[kRows][KT], squares[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    squares[r] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) acc[r][kt] = 0.0f;
  }
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * kChunk; j < d; j += static_cast<int64_t>(blockDim.x) * kChunk) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kChunk), d - j));
    float c[kChunk] = {};
    if (center != nullptr) load_chunk(center + j, count, a.vector_loads, c);
    float p[KT][kChunk];
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      if (kt < probes_here) {
        load_chunk(probes + (k0 + kt) * d + j, count, a.vector_loads, p[kt]);
      } else {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) p[kt][e] = 0.0f;
      }
    }
    float run[kChunk] = {};
    int64_t run_segment = -1;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      float x[kChunk];
      load_chunk(h + (row0 + r) * a.h_row_stride + j, count, a.vector_loads, x);
      if (capture) {
        const int64_t segment = segment_of[r];
        if (segment != run_segment) {
          flush_run(a.sums, run_segment, d, j, count, run);
#pragma unroll
          for (int e = 0; e < kChunk; ++e) run[e] = 0.0f;
          run_segment = segment;
        }
#pragma unroll
        for (int e = 0; e < kChunk; ++e) run[e] += x[e];
      }
#pragma unroll
      for (int e = 0; e < kChunk; ++e) x[e] -= c[e];
#pragma unroll
      for (int kt = 0; kt < KT; ++kt)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) acc[r][kt] += x[e] * p[kt][e];
      if (norms) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) squares[r] += x[e] * x[e];
      }
    }
    if (capture) flush_run(a.sums, run_segment, d, j, count, run);
  }
  if (capture && threadIdx.x == 0) {  // counts, one atomicAdd per run of rows
    int64_t run_segment = -1;
    float run_rows = 0.0f;
    for (int r = 0; r < rows; ++r) {
      if (segment_of[r] != run_segment) {
        if (run_segment >= 0) atomicAdd(a.counts + run_segment, run_rows);
        run_segment = segment_of[r];
        run_rows = 0.0f;
      }
      run_rows += 1.0f;
    }
    if (run_segment >= 0) atomicAdd(a.counts + run_segment, run_rows);
  }

  // reduce over the block: each warp's partial sums to shared memory, then one thread per output adds the warps
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      if (kt >= probes_here) break;
      const float s = warp_sum(acc[r][kt]);
      if (lane == 0) partial[warp][r * (KT + 1) + kt] = s;
    }
    if (norms) {
      const float s = warp_sum(squares[r]);
      if (lane == 0) partial[warp][r * (KT + 1) + KT] = s;
    }
  }
  __syncthreads();
  for (int out = threadIdx.x; out < kOut; out += blockDim.x) {
    const int r = out / (KT + 1), kt = out % (KT + 1);
    if (r >= rows || (kt < KT && kt >= probes_here) || (kt == KT && !norms)) continue;
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += partial[w][out];
    if (kt < KT) a.scores[(row0 + r) * K + k0 + kt] = s;
    else a.norms[row0 + r] = sqrtf(s);
  }
}

}  // namespace device
}  // namespace emovec
