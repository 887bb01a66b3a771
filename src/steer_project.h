// emovec C++ core: the fused steer / project / capture op over raw pointers.
//
// Torch-free on purpose: callers pass data pointers, sizes, strides and dtype codes, so this builds with a
// C++ compiler (and nvcc for the CUDA launcher) alone and never breaks when torch is upgraded.
// The Python layer (emovec.ops) validates every argument before it reaches this header.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace emovec {

// rows the CPU kernel prepares together; one tile of rows or fewer splits its probes among the threads
constexpr int64_t kCpuRowTile = 24;
// from this many rows, probes packed once by the caller (probe_panels_fp32, probe_panels with bf16 rows) take the
// outer-product kernels (one row keeps the dot blocks: their probes split among threads, and lane-wise fp32 sums;
// a build without AVX-512 keeps them up to 3 rows)
constexpr int64_t kCpuPackedMinRows = 2;

// dtype codes shared with python/emovec/_ext.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// error bits shared with python/emovec/ops.py
enum IndexError : int32_t { kSlotOutOfRange = 1, kSegmentOutOfRange = 2 };

// The one rule for a row's slot, shared by the CPU and CUDA kernels: -1 means untouched; a slot < -1, or >= rows
// when there is a table, is out of range (untouched, reported).
#if defined(__CUDACC__)
#define EMOVEC_HD __host__ __device__ __forceinline__
#else
#define EMOVEC_HD inline
#endif
EMOVEC_HD bool slot_out_of_range(int64_t slot, bool has_table, int64_t rows) {
  return slot < -1 || (has_table && slot >= rows);
}
// A cosine bound b as a projection for a row whose part orthogonal to the direction has squared norm r2.
EMOVEC_HD float cosine_bound(float b, float r2) {
  if (b >= 1.0f) return INFINITY;
  if (b <= -1.0f) return -INFINITY;
  const float r = r2 > 0.0f ? sqrtf(r2) : 0.0f;
  return b * r / sqrtf(1.0f - b * b);
}
EMOVEC_HD bool segment_out_of_range(int64_t segment, int64_t segments) { return segment < -1 || segment >= segments; }

struct SteerProjectArgs {
  // residual stream h: [n, d], element (i, j) at h[i * h_row_stride + j]; modified in place when steered
  void* h = nullptr;
  int64_t n = 0, d = 0, h_row_stride = 0;
  int h_dtype = kFloat32;

  // weights, all contiguous and all of one dtype (w_dtype: h_dtype or kFloat32)
  int w_dtype = kFloat32;
  const int64_t* slots = nullptr;  // [n], -1 = untouched (only rows with slot >= 0 are steered/ablated/clamped)
  const void* table = nullptr;     // [table_rows, d], strength already folded in
  int64_t table_rows = 0;          // rows of the table, or of bounds when there is no table (the slots' range)
  const void* ablate = nullptr;    // [num_ablate, d] unit directions, projected out after steering
  int64_t num_ablate = 0;
  const void* probes = nullptr;    // [num_probes, d]
  int64_t num_probes = 0;
  const void* center = nullptr;    // [d] or null

  // Regulation, after steering and ablation, on the same rows: for c = 0 .. num_clamp-1 in order,
  //   p = (x - center)·u_c;  x -= (p - min(max(p, lo), hi)) u_c      lo, hi = bounds[slot][c][0..1]
  // (rows with p already within [lo, hi] are untouched). With relative_bounds the bounds are cosines, turned into
  // projections b·r/sqrt(1 - b²), r = ‖(x - center) - p u_c‖ (±inf for |b| >= 1).
  const void* clamp = nullptr;     // [num_clamp, d] unit directions
  int64_t num_clamp = 0;
  const float* bounds = nullptr;   // [table_rows (1 without slots), num_clamp, 2] fp32
  bool relative_bounds = false;
  float* corrections = nullptr;    // [n, num_clamp] or null: p - clamped p (0 within bounds / rows not steered)

  float* scores = nullptr;  // [n, num_probes] contiguous, or null
  float* norms = nullptr;   // [n] or null
  // CPU only (a prepared call writing into a larger record): row i's scores at scores + i * scores_row_stride and its
  // norm at norms[i * norms_stride]; 0 means contiguous (num_probes and 1). The CUDA launcher refuses other values.
  int64_t scores_row_stride = 0, norms_stride = 0;
  // CPU only: bf16 probes packed once by prepare_probe_panels() (kept by the caller while the probes are unchanged),
  // or null. fp32 h with bf16 probes: the panels are widened exactly to fp32 as they load and meet the fp32 rows in
  // fp32 FMAs, so the probes' bf16 rounding is the only loss; bf16 h and probes, no center: from kCpuPackedMinRows
  // rows, vdpbf16ps on the rows as stored.
  const uint16_t* probe_panels = nullptr;
  // CPU only, fp32 probes: the probes packed by pack_probes_into() (the caller keeps them while the probes are
  // unchanged), or null: from kCpuPackedMinRows rows on they take the outer-product kernel, with no packing per call.
  const float* probe_panels_fp32 = nullptr;
  // CPU only, fp32 h with bf16 probes and no other weights, no center (bf16 dots): each row is rounded to bf16 before
  // its dots,
  // which run in vdpbf16ps (twice the multiply-adds of fp32 FMAs, fp32 accumulation); the norms are the exact rows'.
  // Without AVX-512 bf16 the same rounded rows meet the widened probes in fp32 FMAs (the same products).
  bool round_rows_bf16 = false;

  const int64_t* segments = nullptr;  // [n], -1 = not captured
  float* sums = nullptr;              // [num_segments, d] contiguous, accumulated into
  float* counts = nullptr;            // [num_segments], accumulated into
  int64_t num_segments = 0;

  // Memory safety whatever the indices: a row whose slot is out of range (< -1, or >= table_rows with a table) is
  // left untouched, a row whose segment is out of range (< -1 or >= num_segments) is not captured, and the kernel
  // ORs kSlotOutOfRange / kSegmentOutOfRange into *errors (when not null), without any host synchronisation.
  int32_t* errors = nullptr;

  bool has_slot_rows() const { return table != nullptr || bounds != nullptr; }
  // when slots is null, steering/ablation/clamping applies to every row (table must then be null)
  bool steer_all_rows() const { return slots == nullptr; }
};

// CPU kernel (OpenMP). Throws std::invalid_argument on inconsistent arguments.
void steer_project_cpu(const SteerProjectArgs& args, int num_threads);
// `count` independent calls (a monitor's layers at one decode step) in one parallel region, a call per thread when
// they share out evenly, else one after the other on all the threads; each call's results are bit-identical to
// steer_project_cpu's. Every call is checked first (std::invalid_argument), so none runs if one is inconsistent.
void steer_project_cpu_many(const SteerProjectArgs* calls, int64_t count, int num_threads);

// CUDA launcher: on `stream` (a cudaStream_t passed as an integer), the edit kernel when the call edits, then the
// projection kernel when it scores, takes norms or captures (two launches at most). Throws std::runtime_error
// with the CUDA error text when the launch fails, or when the module was built without CUDA.
void steer_project_cuda(const SteerProjectArgs& args, std::intptr_t stream);

// What this build contains, for `emovec info`.
// The probes of `a` (fp32 h and bf16 probes, or bf16 h and probes without a center) as bf16 pairs in panels of 16,
// for SteerProjectArgs::probe_panels; empty otherwise, or when the kernel has no AVX-512 bf16 dots.
std::vector<uint16_t> prepare_probe_panels(const SteerProjectArgs& a);
// fp32 probes [K, d] packed for SteerProjectArgs::probe_panels_fp32, into out (packed_probes_floats(K, d) floats)
int64_t packed_probes_floats(int64_t K, int64_t d);
void pack_probes_into(const float* probes, int64_t K, int64_t d, float* out);
bool cpu_bf16_dot();  // the CPU kernel dots bf16 rows with AVX-512 bf16 instructions (bf16 probes)
// For benchmarks: the best of `repeats` timed reads of `bytes` bytes at `data` (a vectorised XOR of every 8 bytes, on
// this thread), in seconds: what reading a kernel's operands once from wherever they sit costs on this machine.
double cpu_read_seconds(const void* data, int64_t bytes, int64_t repeats);
bool cuda_compiled();
std::string cuda_architectures();
int cuda_device_count();  // 0 when there is no driver or no device (never throws)

// Basic consistency checks shared by both launchers (the Python layer checks values and devices).
void check_args(const SteerProjectArgs& args);

}  // namespace emovec
