// CPU kernel of the fused steer / project / capture op (OpenMP over row tiles, or over the probes of a single tile).
//
// Per row: load h[i] to fp32, add table[slot[i]], project out the ablation directions, store back in h's
// dtype, then project the stored value (minus center) onto the probes: dot-product register blocks (AVX-512
// intrinsics, or kRows x kProbes x kLanes blocks the compiler vectorises without -ffast-math), or an outer-product
// kernel on probes packed in panels of 16: from 256 rows packed per call, from kCpuPackedMinRows rows packed once by
// a prepared call (up to kPanelSplitMaxRows rows, the panels are split among the threads).
// Capture runs as a second, column-parallel pass, so repeated segments need no atomics and sums are
// deterministic (rows are always added in order).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#define EMOVEC_AVX512 1  // compiled for a CPU with AVX-512 (-march=native on such a machine)
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define EMOVEC_BF16_DOT 1  // compiled for a CPU with AVX-512 bf16
#endif

#include "dtype.h"
#include "steer_project.h"

namespace emovec {
namespace {

constexpr int kRows = 2;        // rows per register block (2 x 4 x 8 accumulators fit AVX2's 16 registers)
constexpr int kProbes = 4;      // probes per register block
constexpr int kLanes = 8;       // independent accumulators per dot (one AVX2 register of fp32)
constexpr int kPad = 16;        // rows and probes zero-padded to a multiple of this (one AVX-512 register of fp32)
constexpr int kRowTile = kCpuRowTile;  // rows prepared together (a multiple of kPanelRows)
constexpr int kPanelRows = 6;   // outer-product micro-kernel: 6 rows x 16 probes = 12 AVX2 accumulators
constexpr int kPanelWidth = 16;
// below this many rows, packing the probes per call costs more than it saves; a fixed count, not one per thread, so
// the kernel (and every score's bits) does not depend on the number of threads
constexpr int64_t kPackMinRows = 256;
constexpr int64_t kPanelSplitMaxRows = 8;  // up to this many rows, the panel kernels split panels among threads
// One tile's probes are split among the threads from this many rows x probes x d, or when its probes alone pass
// kSplitMinProbeBytes (a read that one core's L2 does not hold: two cores read it at twice the rate). Below both, the
// threads' fork and join cost more than they save while the probes are in L2: d = 576, K = 171, fp32, on two Zen 5
// cores, a prepared call took 3.9 / 5.1 us at one row on one / two threads, 7.7 / 8.8 at 8 rows, 12.0 / 9.6 at 12;
// at d = 2048 (1.4 MB of probes) 14.9 / 8.9 us at one row. Probes that come from L3 (30 layers' in turn, as in a
// decode step) gain from two cores from a few rows on: the bench's per-layer op at batch 8 took 0.40 ms a step
// unsplit, 0.31 split. So: from 3 rows at d = 576.
constexpr int64_t kSplitMinWork = 1 << 18;
constexpr int64_t kSplitMinProbeBytes = 1 << 20;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A weight matrix as fp32 rows of length `padded` (zero-padded), converted once per call only when needed.
template <typename W>
struct Fp32Rows {
  std::vector<float> storage;
  const float* data = nullptr;
  int64_t stride = 0;
  Fp32Rows(const void* ptr, int64_t rows, int64_t d, int64_t padded) {
    if (ptr == nullptr) return;
    if (std::is_same<W, float>::value && padded == d) {
      data = static_cast<const float*>(ptr);
      stride = d;
      return;
    }
    storage.assign(rows * padded, 0.0f);
    const W* src = static_cast<const W*>(ptr);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < d; ++j) storage[r * padded + j] = to_float(src[r * d + j]);
    data = storage.data();
    stride = padded;
  }
};

// out[r][p] += dot(x[r][0:len], probe[p][0:len]) for R rows and P probes; len is a multiple of kLanes. The probes
// are fp32, or bf16 (PT = bfloat16_t: fp32 rows against bf16 probes, each widened exactly on load).
template <int R, int P, typename PT = float>
inline void dot_block(const float* x, int64_t x_stride, const PT* const* probe, int64_t len,
                      float* out, int64_t out_stride) {
  float acc[R][P][kLanes] = {};
  for (int64_t j = 0; j < len; j += kLanes) {
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[r][p][l] += x[r * x_stride + j + l] * to_float(probe[p][j + l]);
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += acc[r][p][l];
      out[r * out_stride + p] += s;
    }
}

#ifdef EMOVEC_AVX512
// out[r][p] += dot(x[r], probe[p]) for R rows and P probes with R x P AVX-512 accumulators, no packing: each step
// loads P probe vectors and R row vectors for R x P FMAs (4 x 4: 8 loads per 16 FMAs; 1 x 8 for one row). len is a
// multiple of 16.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const half_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// 16 bf16 values widened to fp32 (exact: a bf16 is the top half of an fp32)
inline __m512 load16(const bfloat16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// the sum of 16 lanes in exactly the order the four-at-once reduction below sums each of its four (a probe's score is
// then the same bits whether its block reduced four probes at once or one: block shapes vary with rows and threads)
inline float reduce_as_four(__m512 a) {
  const __m256 q =
      _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m256 pairs = _mm256_hadd_ps(q, q);
  const __m256 h = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
template <int R, int P, typename PT = float>
inline void dot_block_512(const float* x, int64_t x_stride, const PT* const* probe, int64_t len, float* out,
                          int64_t out_stride) {
  __m512 acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    __m512 pv[P];
    for (int p = 0; p < P; ++p) pv[p] = load16(probe[p] + j);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * x_stride + j);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xv, pv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r) {
    int p = 0;
    for (; p + 4 <= P; p += 4) {  // four sums at once: halve to 256 bits, then two rounds of pairwise adds
      __m256 q[4];
      for (int e = 0; e < 4; ++e)
        q[e] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][p + e]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][p + e]), 1)));
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(q[0], q[1]), _mm256_hadd_ps(q[2], q[3]));
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(out + r * out_stride + p, _mm_add_ps(_mm_loadu_ps(out + r * out_stride + p), sums));
    }
    for (; p < P; ++p) out[r * out_stride + p] += reduce_as_four(acc[r][p]);
  }
}
constexpr int kDotRows = 4, kDotProbes = 4, kDotProbesOneRow = 8;
template <int R, int P, typename PT>
inline void dot_any(const float* x, int64_t xs, const PT* const* p, int64_t len, float* out, int64_t os) {
  dot_block_512<R, P, PT>(x, xs, p, len, out, os);
}
#else
constexpr int kDotRows = kRows, kDotProbes = kProbes, kDotProbesOneRow = kProbes;
template <int R, int P, typename PT>
inline void dot_any(const float* x, int64_t xs, const PT* const* p, int64_t len, float* out, int64_t os) {
  dot_block<R, P, PT>(x, xs, p, len, out, os);
}
#endif

// R rows (1 <= R <= kDotRows, a run-time count) x P probes
template <int P, typename PT>
inline void dot_rows(int R, const float* x, int64_t xs, const PT* const* p, int64_t len, float* out, int64_t os) {
  switch (R) {
#ifdef EMOVEC_AVX512
    case 4: dot_any<4, P, PT>(x, xs, p, len, out, os); break;
    case 3: dot_any<3, P, PT>(x, xs, p, len, out, os); break;
#endif
    case 2: dot_any<2, P, PT>(x, xs, p, len, out, os); break;
    default: dot_any<1, P, PT>(x, xs, p, len, out, os); break;
  }
}

// scores of probes [k0, k1) for `rows` rows, written straight into out (row stride K, which may exceed the number of
// probes: rows of a larger record): one thread's share of a single tile's probes, or a tile's. Rows past `rows` are
// never written.
template <typename PT>
inline void project_range_dots(const float* x, int64_t dp, int rows, const PT* probes, int64_t probe_stride,
                               int64_t k0, int64_t k1, int64_t K, float* out) {
  for (int r = 0; r < rows; ++r) std::fill(out + r * K + k0, out + r * K + k1, 0.0f);
  const PT* p[kDotProbesOneRow];
  if (rows == 1) {  // decode at batch 1: one row against many probes at once
    int64_t k = k0;
    for (; k + kDotProbesOneRow <= k1; k += kDotProbesOneRow) {
      for (int q = 0; q < kDotProbesOneRow; ++q) p[q] = probes + (k + q) * probe_stride;
      dot_any<1, kDotProbesOneRow, PT>(x, dp, p, dp, out + k, K);
    }
    for (; k < k1; ++k) {
      p[0] = probes + k * probe_stride;
      dot_any<1, 1, PT>(x, dp, p, dp, out + k, K);
    }
    return;
  }
  // rows in chunks that stay in L1 while all the probes stream past (re-reading 24 rows of d = 576 for every four
  // probes would read 55 KB from L2 each time)
  constexpr int kChunk = 2 * kDotRows;
  for (int c = 0; c < rows; c += kChunk) {
    const int chunk = std::min(kChunk, rows - c);
    const float* xc = x + c * dp;
    float* oc = out + c * K;
    int64_t k = k0;
    for (; k + kDotProbes <= k1; k += kDotProbes) {
      for (int q = 0; q < kDotProbes; ++q) p[q] = probes + (k + q) * probe_stride;
      for (int r = 0; r < chunk; r += kDotRows)
        dot_rows<kDotProbes, PT>(std::min(kDotRows, chunk - r), xc + r * dp, dp, p, dp, oc + r * K + k, K);
    }
    for (; k < k1; ++k) {
      p[0] = probes + k * probe_stride;
      for (int r = 0; r < chunk; r += kDotRows)
        dot_rows<1, PT>(std::min(kDotRows, chunk - r), xc + r * dp, dp, p, dp, oc + r * K + k, K);
    }
  }
}

// Probes packed in panels of 16: panel[(t * d + j) * 16 + q] = probe[t * 16 + q][j] (zero past K).
std::vector<float> pack_probes(const float* probes, int64_t probe_stride, int64_t K, int64_t d, int num_threads) {
  const int64_t panels = (K + kPanelWidth - 1) / kPanelWidth;
  std::vector<float> packed(panels * d * kPanelWidth, 0.0f);
  // panel by panel, writing each panel in order (16 read streams, one sequential write stream)
#pragma omp parallel for num_threads(num_threads) schedule(static) if (K * d > 65536)
  for (int64_t t = 0; t < panels; ++t) {
    const int64_t width = std::min<int64_t>(kPanelWidth, K - t * kPanelWidth);
    float* dst = packed.data() + t * d * kPanelWidth;
    const float* src = probes + t * kPanelWidth * probe_stride;
    for (int64_t j = 0; j < d; ++j)
      for (int64_t q = 0; q < width; ++q) dst[j * kPanelWidth + q] = src[q * probe_stride + j];
  }
  return packed;
}

// scores of a tile of rows with the outer-product kernel: acc[r][q] += x[r][j] * panel[j][q], a GEMM micro-kernel
// with no horizontal sums (the form BLAS uses), 6 rows x 16 probes at a time.
inline void project_tile_packed(const float* x, int64_t dp, int64_t d, int rows, const float* packed, int64_t K,
                                float* tile_scores) {
  const int64_t panels = (K + kPanelWidth - 1) / kPanelWidth;
  for (int r0 = 0; r0 < rows; r0 += kPanelRows) {
    for (int64_t t = 0; t < panels; ++t) {
      const float* panel = packed + t * d * kPanelWidth;
      float acc[kPanelRows][kPanelWidth] = {};
      for (int64_t j = 0; j < d; ++j) {
        const float* pj = panel + j * kPanelWidth;
        for (int r = 0; r < kPanelRows; ++r) {
          const float xv = x[(r0 + r) * dp + j];
#pragma omp simd
          for (int q = 0; q < kPanelWidth; ++q) acc[r][q] += xv * pj[q];
        }
      }
      const int64_t width = std::min<int64_t>(kPanelWidth, K - t * kPanelWidth);
      for (int r = 0; r < kPanelRows && r0 + r < rows; ++r)
        std::copy(acc[r], acc[r] + width, tile_scores + (r0 + r) * K + t * kPanelWidth);
    }
  }
}

#ifdef EMOVEC_AVX512
// NR rows x NP fp32 panels of 16 probes: acc[r][p] += x[r][j] * panel[j] over j in order, one FMA chain per (row,
// panel), so a score is summed exactly as the portable kernel above sums it. Each panel row is loaded once for NR
// rows and each row value broadcast once for NP panels; the last panel of the block is stored masked to its width
// straight into the scores (row stride `stride`).
// With PF, the first `prefetch_lines` 64-byte lines from `prefetch` are fetched into L2 on the way, one per column
// (a template argument: a test in the loop cost blocks of few rows up to 40%).
template <int NR, int NP, bool PF = false>
inline void packed_block(const float* x, int64_t x_stride, int64_t d, const float* panel, int64_t panel_step,
                         float* out, int64_t stride, int64_t last_width, const char* prefetch = nullptr,
                         int64_t prefetch_lines = 0) {
  __m512 acc[NR][NP];
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  auto column = [&](int64_t j) {
    __m512 pv[NP];
    for (int p = 0; p < NP; ++p) pv[p] = _mm512_loadu_ps(panel + p * panel_step + j * kPanelWidth);
    for (int r = 0; r < NR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * x_stride + j]);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_fmadd_ps(xv, pv[p], acc[r][p]);
    }
  };
  int64_t j = 0;
  if constexpr (PF) {  // the prefetching columns first
    for (const int64_t first = std::min(d, prefetch_lines); j < first; ++j) {
      _mm_prefetch(prefetch + j * 64, _MM_HINT_T1);
      column(j);
    }
  }
  for (; j < d; ++j) column(j);
  const __mmask16 last = static_cast<__mmask16>((1u << last_width) - 1u);
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p)
      _mm512_mask_storeu_ps(out + r * stride + p * kPanelWidth, p + 1 < NP ? __mmask16(0xFFFF) : last, acc[r][p]);
}

// panels [t0, t1) in blocks of NP, the rest in one block of 3 or 2 (when narrower than NP) or single panels:
// block(std::integral_constant<int, W>(), t) runs panels [t, t + W) (fewer panels at once leave fewer FMA chains)
template <int NP, typename Block>
inline void for_panel_blocks(int64_t t0, int64_t t1, Block&& block) {
  int64_t t = t0;
  for (; t + NP <= t1; t += NP) block(std::integral_constant<int, NP>(), t);
  const int64_t rest = t1 - t;
  if constexpr (NP > 3) {
    if (rest == 3) return block(std::integral_constant<int, 3>(), t);
  }
  if constexpr (NP > 2) {
    if (rest == 2) return block(std::integral_constant<int, 2>(), t);
  }
  for (; t < t1; ++t) block(std::integral_constant<int, 1>(), t);
}

// NR rows x panels [t0, t1), NP at a time
template <int NR, int NP>
inline void packed_panels(const float* x, int64_t x_stride, int64_t d, const float* packed, int64_t K, int64_t t0,
                          int64_t t1, float* out, int64_t stride) {
  const int64_t step = d * kPanelWidth;
  for_panel_blocks<NP>(t0, t1, [&](auto width, int64_t t) {
    constexpr int W = decltype(width)::value;
    packed_block<NR, W>(x, x_stride, d, packed + t * step, step, out + t * kPanelWidth, stride,
                        std::min<int64_t>(kPanelWidth, K - (t + W - 1) * kPanelWidth));
  });
}

// scores of `rows` rows (exactly: no padding rows computed) against packed fp32 panels [t0, t1), into out (row stride
// `stride`): 8 rows x 2 panels (16 accumulators, 2 loads and 8 broadcasts per 16 FMAs), fewer rows x 4 panels. A
// score is summed the same way whatever the rows and panels around it.
// From 16 rows the blocks of 8 go panel pair by panel pair, each pair meeting every block while it is in L1/L2, and
// the next pair is fetched into L2 meanwhile (spread over the blocks, a line per column): inside a forward pass a
// decode window's probes come from DRAM, which a sweep of all the panels per block of rows waited for. A window of
// 8 steps x 8 rows x 30 layers after a 64 MB stream, two cores, each build in its own process, alternated three
// times: 160 / 160 / 171 us a step against 174 / 173 / 180 without; with the probes in L3, 140 / 143 / 143 against
// 140 / 141 / 155.
void project_rows_packed(const float* x, int64_t dp, int64_t d, int rows, const float* packed, int64_t K, int64_t t0,
                         int64_t t1, float* out, int64_t stride) {
  int r0 = 0;
  if (rows >= 16) {
    const int64_t step = d * kPanelWidth;
    const int full = rows / 8 * 8, blocks = full / 8;
    for_panel_blocks<2>(t0, t1, [&](auto width, int64_t t) {
      constexpr int W = decltype(width)::value;
      const int64_t last_width = std::min<int64_t>(kPanelWidth, K - (t + W - 1) * kPanelWidth);
      const int64_t next_panels = std::min<int64_t>(2, t1 - (t + W));
      const char* next = reinterpret_cast<const char*>(packed + (t + W) * step);
      const int64_t lines = next_panels > 0 ? next_panels * step * 4 / 64 : 0;
      const int64_t per_block = (lines + blocks - 1) / blocks;
      for (int b = 0; b < blocks; ++b) {
        const int64_t first = std::min<int64_t>(lines, b * per_block);
        packed_block<8, W, true>(x + b * 8 * dp, dp, d, packed + t * step, step,
                                 out + b * 8 * stride + t * kPanelWidth, stride, last_width, next + first * 64,
                                 std::min<int64_t>(per_block, lines - first));
      }
    });
    r0 = full;
  }
  for (; r0 + 8 <= rows; r0 += 8)
    packed_panels<8, 2>(x + r0 * dp, dp, d, packed, K, t0, t1, out + r0 * stride, stride);
  const float* xr = x + r0 * dp;
  float* o = out + r0 * stride;
  switch (rows - r0) {
    case 7: packed_panels<7, 2>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 6: packed_panels<6, 2>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 5: packed_panels<5, 2>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 4: packed_panels<4, 4>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 3: packed_panels<3, 4>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 2: packed_panels<2, 4>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    case 1: packed_panels<1, 4>(xr, dp, d, packed, K, t0, t1, o, stride); break;
    default: break;
  }
}
#endif

// dot product of two fp32 rows with kLanes independent accumulators (vectorised without -ffast-math).
inline float dot_lanes(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < d; ++j) s += a[j] * b[j];
  return s;
}

// Regulation of one row x (fp32, d values) along C unit directions, one after the other (see steer_project.h).
// y is scratch for x - center; uu[c] = ‖u_c‖². A row within a direction's bounds is not touched (bit-identical).
void clamp_row(float* x, float* y, int64_t d, const float* clamp, const float* uu, int64_t C, const float* bounds,
               const float* center, bool relative, float* corrections) {
  if (center) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) y[j] = x[j] - center[j];
  } else {
    std::copy(x, x + d, y);
  }
  float n2 = relative ? dot_lanes(y, y, d) : 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* u = clamp + c * d;
    const float p = dot_lanes(y, u, d);
    float lo = bounds[c * 2], hi = bounds[c * 2 + 1];
    if (relative) {
      const float r2 = n2 - p * p;
      lo = cosine_bound(lo, r2);
      hi = cosine_bound(hi, r2);
    }
    const float q = std::min(std::max(p, lo), hi);
    const float delta = p - q;
    if (corrections) corrections[c] = delta;
    if (delta == 0.0f) continue;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      x[j] -= delta * u[j];
      y[j] -= delta * u[j];
    }
    n2 += delta * delta * uu[c] - 2.0f * delta * p;  // ‖y - δu‖² = ‖y‖² - 2δp + δ²‖u‖²
  }
}

// fp32 values rounded to the nearest bf16 (from_float<bfloat16_t>'s rounding), vectorised: the rows of bf16 dots
// (SteerProjectArgs::round_rows_bf16)
inline void round_to_bf16(const float* x, int64_t d, bfloat16_t* out) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) bits[j] = static_cast<uint16_t>(bf16_rounded_bits(float_to_bits(x[j])));
}
inline void round_to_bf16_values(float* x, int64_t d) {  // in place, as the fp32 values of those bf16
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) x[j] = bits_to_float(bf16_rounded_bits(float_to_bits(x[j])) << 16);
}

#ifdef EMOVEC_BF16_DOT
// Probes as bf16 pairs in panels of 16: panel[(t * pairs + jp) * 32 + 2q + e] = bf16(probe[t*16+q][2jp+e]), zero past
// K and d. One 512-bit load gives the 16 probes' pairs for one pair of columns: the operand of vdpbf16ps.
std::vector<uint16_t> pack_probes_bf16(const float* probes, int64_t probe_stride, int64_t K, int64_t d,
                                       int num_threads) {
  const int64_t panels = (K + kPanelWidth - 1) / kPanelWidth, pairs = (d + 1) / 2;
  std::vector<uint16_t> packed(panels * pairs * 32, 0);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (K * d > 65536)
  for (int64_t k = 0; k < K; ++k) {
    const int64_t t = k / kPanelWidth, q = k % kPanelWidth;
    for (int64_t j = 0; j < d; ++j)
      packed[(t * pairs + j / 2) * 32 + 2 * q + (j & 1)] = from_float<bfloat16_t>(probes[k * probe_stride + j]).bits;
  }
  return packed;
}

// NR rows x NP panels of 16 probes: acc[r][p] += x-pair . panel-pair with vdpbf16ps (products exact, fp32
// accumulation); each row pair is broadcast once for NP panels. NR, NP are template arguments so the accumulators
// stay in registers.
template <int NR, int NP>
inline void bf16_block(const bfloat16_t* h, int64_t row_stride, int64_t d, const uint16_t* panel, int64_t panel_step,
                       float* out, int64_t out_stride, int64_t last_width) {
  const int64_t full = d / 2;
  __m512 acc[NR][NP];
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  const bfloat16_t* row[NR];
  for (int r = 0; r < NR; ++r) row[r] = h + r * row_stride;
  uint32_t pairs[NR];
  auto step = [&](int64_t jp) {
    __m512bh b[NP];
    for (int p = 0; p < NP; ++p) b[p] = (__m512bh)_mm512_loadu_si512(panel + p * panel_step + jp * 32);
    for (int r = 0; r < NR; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[r]));
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], x, b[p]);
    }
  };
  for (int64_t jp = 0; jp < full; ++jp) {
    for (int r = 0; r < NR; ++r) std::memcpy(&pairs[r], row[r] + 2 * jp, 4);
    step(jp);
  }
  if (full * 2 < d) {  // odd d: the last column pairs with a zero (never read past the row)
    for (int r = 0; r < NR; ++r) pairs[r] = row[r][d - 1].bits;
    step(full);
  }
  const __mmask16 last = static_cast<__mmask16>((1u << last_width) - 1u);
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p)
      _mm512_mask_storeu_ps(out + r * out_stride + p * kPanelWidth, p + 1 < NP ? __mmask16(0xFFFF) : last, acc[r][p]);
}

// one block of NR rows x np panels, np <= NP chosen at run time (the accumulators stay in registers)
template <int NR, int NP>
inline void bf16_block_of(int np, const bfloat16_t* h, int64_t row_stride, int64_t d, const uint16_t* panel,
                          int64_t panel_step, float* out, int64_t out_stride, int64_t last_width) {
  if constexpr (NP > 1) {
    if (np < NP) {
      bf16_block_of<NR, NP - 1>(np, h, row_stride, d, panel, panel_step, out, out_stride, last_width);
      return;
    }
  }
  bf16_block<NR, NP>(h, row_stride, d, panel, panel_step, out, out_stride, last_width);
}

// NR bf16 rows (as stored) x panels [t0, panels): 8 rows 2 panels at a time (16 chains of vdpbf16ps), fewer rows
// more panels at once (one row: up to 12), and a last odd panel joined to the block before it. vdpbf16ps has a
// latency of 6 cycles on Zen 5 against 4 for an FMA: in a register-only loop there, 8 independent chains ran at 67%
// of its peak rate, 12 at 91%, 14 at 96%. Every score is one chain over its pairs, however many panels share its block.
template <int NR>
inline void bf16_rows(const bfloat16_t* h, int64_t row_stride, int64_t d, const uint16_t* packed, int64_t K,
                      int64_t t0, int64_t panels, float* out, int64_t stride) {
  const int64_t step = (d + 1) / 2 * 32;
  constexpr int kMax = NR == 1 ? 12 : NR == 2 ? 6 : NR == 3 ? 4 : 3;  // accumulators + panels + 1 <= 32 registers
  constexpr int kWide = NR <= 4 ? kMax : 2;
  for (int64_t t = t0; t < panels;) {
    const int64_t rest = panels - t;
    const int np = static_cast<int>(rest == kWide + 1 && kWide < kMax ? rest : std::min<int64_t>(kWide, rest));
    const int64_t last = t + np - 1, last_width = std::min<int64_t>(kPanelWidth, K - last * kPanelWidth);
    bf16_block_of<NR, kMax>(np, h, row_stride, d, packed + t * step, step, out + t * kPanelWidth, stride, last_width);
    t += np;
  }
}

// scores of a tile of bf16 rows (as stored in h, no center) against bf16-pair panels [t0, t1), 8 rows at a time,
// into out (row stride `stride`)
void project_tile_bf16(const bfloat16_t* h, int64_t row_stride, int64_t d, int rows, const uint16_t* packed, int64_t K,
                       int64_t t0, int64_t t1, float* scores, int64_t stride) {
  int r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) bf16_rows<8>(h + r0 * row_stride, row_stride, d, packed, K, t0, t1, scores + r0 * stride, stride);
  const bfloat16_t* rows_h = h + r0 * row_stride;
  float* out = scores + r0 * stride;
  switch (rows - r0) {
    case 7: bf16_rows<7>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 6: bf16_rows<6>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 5: bf16_rows<5>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 4: bf16_rows<4>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 3: bf16_rows<3>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 2: bf16_rows<2>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    case 1: bf16_rows<1>(rows_h, row_stride, d, packed, K, t0, t1, out, stride); break;
    default: break;
  }
}

// NR fp32 rows (row stride x_stride, zero from column d to an even length) x NP panels of 16 probes: the panel's
// bf16 pairs widened exactly to fp32 (a pair's even column is its low half shifted up, its odd column its high half
// masked), then fp32 FMAs with the row's columns broadcast: exact products of fp32 rows and bf16 probes, fp32 sums,
// as with fp32 probes of those values. One load, a shift and a mask per pair and panel serve all NR rows; even and
// odd columns accumulate apart, 2 x NR x NP accumulators, so the FMAs' latency is hidden. (vdpbf16ps would need
// the rows in bf16 too: splitting them into hi + lo halves took two dots per pair at half the FMA rate on Zen 4.)
template <int NR, int NP>
inline void widen_block(const float* x, int64_t x_stride, int64_t pairs, const uint16_t* panel, int64_t panel_step,
                        float* out, int64_t out_stride, int64_t last_width) {
  __m512 even[NR][NP], odd[NR][NP];
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p) even[r][p] = odd[r][p] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512 pe[NP], po[NP];
    for (int p = 0; p < NP; ++p) {
      const __m512i b = _mm512_loadu_si512(panel + p * panel_step + jp * 32);
      pe[p] = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
      po[p] = _mm512_castsi512_ps(_mm512_and_si512(b, high));
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 xe = _mm512_set1_ps(x[r * x_stride + 2 * jp]);
      const __m512 xo = _mm512_set1_ps(x[r * x_stride + 2 * jp + 1]);
      for (int p = 0; p < NP; ++p) {
        even[r][p] = _mm512_fmadd_ps(xe, pe[p], even[r][p]);
        odd[r][p] = _mm512_fmadd_ps(xo, po[p], odd[r][p]);
      }
    }
  }
  alignas(64) float lanes[kPanelWidth];
  for (int r = 0; r < NR; ++r)
    for (int p = 0; p < NP; ++p) {
      const __m512 sum = _mm512_add_ps(even[r][p], odd[r][p]);
      float* o = out + r * out_stride + p * kPanelWidth;
      if (p + 1 < NP || last_width == kPanelWidth) {
        _mm512_storeu_ps(o, sum);
      } else {
        _mm512_store_ps(lanes, sum);
        std::copy(lanes, lanes + last_width, o);
      }
    }
}

// NR rows x panels [t0, t1), NP at a time (one row x one panel would leave two FMA chains, half the FMA rate at their
// latency: with K = 171, 3 of 11 panels)
template <int NR, int NP>
inline void widen_panels(const float* x, int64_t x_stride, int64_t pairs, const uint16_t* panels, int64_t K,
                         int64_t t0, int64_t t1, float* out, int64_t stride) {
  const int64_t step = pairs * 32;
  for_panel_blocks<NP>(t0, t1, [&](auto width, int64_t t) {
    constexpr int W = decltype(width)::value;
    widen_block<NR, W>(x, x_stride, pairs, panels + t * step, step, out + t * kPanelWidth, stride,
                       std::min<int64_t>(kPanelWidth, K - (t + W - 1) * kPanelWidth));
  });
}

// fp32 rows x (row stride x_stride, zero from column d to an even length) x panels [t0, t1) of bf16 probes into out
// (row stride `stride`): every score summed the same way whatever the split of the panels among threads (a panel's
// dots do not depend on which panels share its block)
void project_widened(const float* x, int64_t x_stride, int64_t pairs, int rows, const uint16_t* panels, int64_t K,
                     int64_t t0, int64_t t1, float* out, int64_t stride) {
  int r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8)  // 8 rows x 1 panel: 16 accumulators, 2 widened panels (6% faster than 2 x 4 x 2)
    widen_panels<8, 1>(x + r0 * x_stride, x_stride, pairs, panels, K, t0, t1, out + r0 * stride, stride);
  for (; r0 + 4 <= rows; r0 += 4)  // 4 rows x 2 panels: 16 accumulators, 4 widened panels
    widen_panels<4, 2>(x + r0 * x_stride, x_stride, pairs, panels, K, t0, t1, out + r0 * stride, stride);
  for (; r0 < rows; ++r0)  // 1 row x 4 panels: 8 accumulators, 8 widened panels
    widen_panels<1, 4>(x + r0 * x_stride, x_stride, pairs, panels, K, t0, t1, out + r0 * stride, stride);
}
#endif

// this thread's index in its OpenMP team and the team's size (0 and 1 without OpenMP)
inline std::pair<int64_t, int64_t> team_position() {
#ifdef _OPENMP
  return {omp_get_thread_num(), omp_get_num_threads()};
#else
  return {0, 1};
#endif
}

#ifdef EMOVEC_BF16_DOT
// scores of `rows` fp32 rows (row stride x_stride) rounded to bf16, against bf16-pair panels [t0, t1) with vdpbf16ps
// (bf16 dots): the rows are rounded into a scratch of this thread's, then dotted as stored bf16 rows are
void project_rounded(const float* x, int64_t x_stride, int64_t d, int rows, const uint16_t* packed, int64_t K,
                     int64_t t0, int64_t t1, float* scores, int64_t stride) {
  thread_local std::vector<bfloat16_t> tile;
  const int64_t tile_stride = round_up(d, 32);  // 64-byte rows
  if (static_cast<int64_t>(tile.size()) < rows * tile_stride) tile.resize(rows * tile_stride);
  for (int r = 0; r < rows; ++r) round_to_bf16(x + r * x_stride, d, tile.data() + r * tile_stride);
  project_tile_bf16(tile.data(), tile_stride, d, rows, packed, K, t0, t1, scores, stride);
}
#endif

// rows x K scores of a tile (row stride K) into out (row stride `stride`)
inline void copy_rows(const float* tile, int rows, int64_t K, float* out, int64_t stride) {
  for (int r = 0; r < rows; ++r) std::copy(tile + r * K, tile + (r + 1) * K, out + r * stride);
}

void report(int32_t* errors, int32_t bit) {
  if (errors != nullptr) __atomic_fetch_or(errors, bit, __ATOMIC_RELAXED);
}

template <typename H, typename W>
void run(const SteerProjectArgs& a, int num_threads) {
  const int64_t n = a.n, d = a.d, K = a.num_probes, A = a.num_ablate, C = a.num_clamp;
  const int64_t dp = round_up(d, kPad);
  H* h = static_cast<H*>(a.h);
  const bool edits = a.table != nullptr || A > 0 || C > 0;
  const bool projects = a.scores != nullptr || a.norms != nullptr;
  const int64_t scores_stride = a.scores_row_stride > 0 ? a.scores_row_stride : K;  // rows of a larger record
  const int64_t norms_stride = a.norms_stride > 0 ? a.norms_stride : 1;

  // Packing the probes (a transposing copy of all of them) costs too much per call below many rows per thread; probes
  // packed by the caller once and kept across calls (a prepared call) pay from kCpuPackedMinRows rows on:
  // - probe_panels_fp32 (fp32 probes): the outer-product kernel on the prepared fp32 rows;
  // - probe_panels (bf16 panels) with bf16 rows and no center: vdpbf16ps on the rows as stored (bf16_path below);
  // - probe_panels with fp32 rows (bf16 probes): the panels widened exactly to fp32 as they load (panels_path).
  const bool cached_panels = a.probe_panels_fp32 != nullptr && a.scores != nullptr;
  const bool cached_bf16_rows = std::is_same<H, bfloat16_t>::value && a.probe_panels != nullptr &&
                                a.scores != nullptr && a.center == nullptr;
#ifdef EMOVEC_AVX512
  constexpr int64_t packed_min_rows = kCpuPackedMinRows;
#else
  constexpr int64_t packed_min_rows = 4;  // the portable kernel pads to blocks of 6 rows on one thread: dots below
#endif
  const bool packed_path = a.scores != nullptr &&
                           (a.probe_panels == nullptr ? n >= kPackMinRows ||
                                                            (cached_panels && n >= packed_min_rows)
                                                      : cached_bf16_rows && n >= packed_min_rows);
#ifdef EMOVEC_BF16_DOT
  const bool panels_path = std::is_same<H, float>::value && a.probe_panels != nullptr && a.scores != nullptr;
#else
  constexpr bool panels_path = false;
#endif
  // bf16 dots: fp32 rows rounded to bf16 (the norms are the exact rows'), then vdpbf16ps against the bf16 panels (or,
  // without them, the rounded values against the probes widened to fp32: the same products). No center (check_args)
  const bool round_rows = std::is_same<H, float>::value && a.round_rows_bf16;
  // 16-bit probes (fp32 rows with bf16 probes, or fp16 / bf16 rows with probes in their dtype) are read as they are
  // by the dot blocks, widened on load: no fp32 copy of all the probes per call
  const bool direct_bf16 = !std::is_same<W, float>::value && dp == d && !packed_path && !panels_path;
  const bool probes_prepacked = packed_path && (cached_panels || cached_bf16_rows);  // no fp32 rows of them needed
  Fp32Rows<W> probes(direct_bf16 || panels_path || probes_prepacked ? nullptr : a.probes, K, d, dp),
      ablate(a.ablate, A, d, d),
      table(a.table, a.table_rows, d, d), center(a.center, 1, d, d), clamp(a.clamp, C, d, d);
  // scores of probes [k0, k1) for `rows` prepared rows x into out (row stride `stride`)
  auto dots = [&](const float* x, int rows, int64_t k0, int64_t k1, int64_t stride, float* out) {
#ifdef EMOVEC_BF16_DOT
    if (panels_path && round_rows) {  // x's rows are rounded already (prepare): their bf16 pairs are exact
      project_rounded(x, dp, d, rows, a.probe_panels, K, k0 / kPanelWidth, (k1 + kPanelWidth - 1) / kPanelWidth, out,
                      stride);
      return;
    }
    if (panels_path) {  // k0, k1 are whole panels here (or K); x's padding columns are zero (dp >= 2 pairs)
      project_widened(x, dp, (d + 1) / 2, rows, a.probe_panels, K, k0 / kPanelWidth,
                      (k1 + kPanelWidth - 1) / kPanelWidth, out, stride);
      return;
    }
#endif
    if (direct_bf16)
      project_range_dots(x, dp, rows, static_cast<const W*>(a.probes), d, k0, k1, stride, out);
    else
      project_range_dots(x, dp, rows, probes.data, probes.stride, k0, k1, stride, out);
  };
  std::vector<float> clamp_sq(C);  // ‖u_c‖², once per call
  for (int64_t c = 0; c < C; ++c) clamp_sq[c] = dot_lanes(clamp.data + c * d, clamp.data + c * d, d);
#ifdef EMOVEC_BF16_DOT
  // bf16 rows and no center: dot the rows as stored against bf16 probes with vdpbf16ps (half the probe bytes, twice
  // the multiply rate); the probes' rounding to bf16 is the only change against the fp32 path
  const bool bf16_path = packed_path && std::is_same<H, bfloat16_t>::value && a.center == nullptr && !cached_panels;
  const std::vector<uint16_t> packed_bf16 = bf16_path && !cached_bf16_rows
                                                ? pack_probes_bf16(probes.data, probes.stride, K, d, num_threads)
                                                : std::vector<uint16_t>();
  const uint16_t* bf16_panels = cached_bf16_rows ? a.probe_panels : packed_bf16.data();
#else
  constexpr bool bf16_path = false;
#endif
  const std::vector<float> packed = packed_path && !bf16_path && !cached_panels
                                       ? pack_probes(probes.data, probes.stride, K, d, num_threads)
                                       : std::vector<float>();
  const float* packed_data = cached_panels ? a.probe_panels_fp32 : packed.data();
#ifdef EMOVEC_AVX512
  // the AVX-512 packed kernel computes exactly the tile's rows, straight into the scores (so one tile of rows splits
  // its panels among the threads); the portable one reads whole blocks of kPanelRows rows (zero past the tile's)
  // into a tile of scores
  constexpr bool pad_rows = false;
#else
  const bool pad_rows = packed_path;
#endif
  // scores of probes [k0, k1) (whole panels on the panel kernels) for the `rows` rows from row0, prepared in x, into
  // out (row stride scores_stride); the portable packed kernel (pad_rows) is called by the tiles below instead
  auto tile_dots = [&](int64_t row0, const float* x, int rows, int64_t k0, int64_t k1, float* out) {
    const int64_t t0 = k0 / kPanelWidth, t1 = (k1 + kPanelWidth - 1) / kPanelWidth;
    (void)row0, (void)t0, (void)t1;
#ifdef EMOVEC_BF16_DOT
    if (bf16_path) {
      project_tile_bf16(reinterpret_cast<const bfloat16_t*>(h) + row0 * a.h_row_stride, a.h_row_stride, d, rows,
                        bf16_panels, K, t0, t1, out, scores_stride);
      return;
    }
#endif
#ifdef EMOVEC_AVX512
    if (packed_path) {
      project_rows_packed(x, dp, d, rows, packed_data, K, t0, t1, out, scores_stride);
      return;
    }
#endif
    dots(x, rows, k0, k1, scores_stride, out);
  };

  // one tile of rows: load to fp32, edit and store back (keeping exactly what was stored), center, norms
  // x holds `rows` rows, or kRowTile rows with the ones past `rows` zeroed when `pad_tile` (the packed kernels read
  // whole panels of rows); its padding columns d..dp stay zero from its allocation
  auto prepare = [&](int64_t row0, int rows, float* x, float* coef, float* centered, bool pad_tile) {
    for (int r = 0; r < (pad_tile ? kRowTile : rows); ++r) {
      float* xr = x + r * dp;
      if (r >= rows) { std::fill(xr, xr + dp, 0.0f); continue; }
      const int64_t i = row0 + r;
      H* hr = h + i * a.h_row_stride;
      for (int64_t j = 0; j < d; ++j) xr[j] = to_float(hr[j]);
      bool active = a.slots == nullptr || a.slots[i] >= 0;
      if (a.corrections != nullptr) std::fill(a.corrections + i * C, a.corrections + (i + 1) * C, 0.0f);
      if (a.slots != nullptr && slot_out_of_range(a.slots[i], a.has_slot_rows(), a.table_rows)) {
        active = false;
        report(a.errors, kSlotOutOfRange);
      }
      if (edits && active) {
        if (table.data) {
          const float* t = table.data + a.slots[i] * d;
          for (int64_t j = 0; j < d; ++j) xr[j] += t[j];
        }
        for (int64_t q = 0; q < A; ++q) {  // all coefficients from the steered row, then subtract
          coef[q] = dot_lanes(xr, ablate.data + q * d, d);
        }
        for (int64_t q = 0; q < A; ++q) {
          const float* u = ablate.data + q * d;
          for (int64_t j = 0; j < d; ++j) xr[j] -= coef[q] * u[j];
        }
        if (C > 0)
          clamp_row(xr, centered, d, clamp.data, clamp_sq.data(), C, a.bounds + (a.slots ? a.slots[i] : 0) * C * 2,
                    center.data, a.relative_bounds, a.corrections ? a.corrections + i * C : nullptr);
        for (int64_t j = 0; j < d; ++j) {  // store, and keep exactly what was stored
          hr[j] = from_float<H>(xr[j]);
          xr[j] = to_float(hr[j]);
        }
      }
      if (center.data)
        for (int64_t j = 0; j < d; ++j) xr[j] -= center.data[j];
      if (a.norms) a.norms[i * norms_stride] = std::sqrt(dot_lanes(xr, xr, d));
      if (round_rows) round_to_bf16_values(xr, d);
    }
  };

  if (!edits && !projects) {
    // nothing per row
  } else if (n <= kRowTile && (!packed_path || (!pad_rows && n <= kPanelSplitMaxRows))) {
    // one tile (decode): prepared once on this thread, then its probes split among the threads, each writing its own
    // columns of the scores (no copy, no atomics). With one row tile, splitting rows would leave all but one idle.
    const int rows = static_cast<int>(n);
    std::vector<float> x(rows * dp, 0.0f), coef(A), centered(C > 0 ? d : 0);
    prepare(0, rows, x.data(), coef.data(), centered.data(), false);
    if (a.scores != nullptr) {
      // whole probe blocks per thread, so each score is summed by the same block shape on any thread count
      const int64_t unit = panels_path || packed_path ? kPanelWidth : rows == 1 ? kDotProbesOneRow : kDotProbes;
      const int64_t groups = (K + unit - 1) / unit;
      const int64_t probe_bytes = K * d * (std::is_same<W, float>::value && a.probe_panels == nullptr ? 4 : 2);
      const bool split = num_threads > 1 && groups > 1 &&
                         (n * K * d >= kSplitMinWork || probe_bytes >= kSplitMinProbeBytes);
      const int threads = split ? static_cast<int>(std::min<int64_t>(num_threads, groups)) : 1;
      if (!split) {  // no parallel region at all: even an inactive one costs a team's set-up
        tile_dots(0, x.data(), rows, 0, K, a.scores);
      } else
#pragma omp parallel num_threads(threads)
      {
        const auto [t, T] = team_position();
        const int64_t k0 = std::min(K, groups * t / T * unit), k1 = std::min(K, groups * (t + 1) / T * unit);
        tile_dots(0, x.data(), rows, k0, k1, a.scores);
      }
    }
  } else {
    // tiles of about equal size (a multiple of the micro-kernel's rows; the AVX-512 panel kernels take any number),
    // as many as a multiple of the threads: two threads on 64 rows get 36 and 28, not 48 and 16
    const int64_t blocks = round_up((n + kRowTile - 1) / kRowTile, num_threads);  // a whole number per thread
    const int64_t multiple = pad_rows ? kPanelRows : packed_path ? 1 : 4;
    const int64_t tile = std::min<int64_t>(kRowTile, round_up((n + blocks - 1) / blocks, multiple));
    const int64_t num_tiles = (n + tile - 1) / tile;
    // the packed fp32 panels on fp32 rows that no edit, center, slot or correction touches: no copy of the rows
    // (inside a forward pass they come from L3; the copy cost ~5% of a prefill layer's call)
    // (or the bf16 panels widened, with an even d: their pairs read no column past the row; bf16 dots round the rows
    // there. Without the panels (no AVX-512 bf16) rows to round go through the tiles, whose prepare rounds them)
    const bool rows_as_stored = std::is_same<H, float>::value &&
                                ((packed_path && !bf16_path && !pad_rows && !round_rows) ||
                                 (panels_path && d % 2 == 0)) && !edits &&
                                center.data == nullptr && a.slots == nullptr && a.corrections == nullptr &&
                                a.scores != nullptr;
    // rows [r0, r1) of those, in chunks of a tile: each chunk's norms, then its dots while its rows are in L1/L2
    auto stored_rows = [&](int64_t r0, int64_t r1) {
#ifdef EMOVEC_AVX512
      const float* hf = reinterpret_cast<const float*>(h);
      const int64_t panels = (K + kPanelWidth - 1) / kPanelWidth;
      for (int64_t c0 = r0; c0 < r1; c0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, r1 - c0));
        const float* x = hf + c0 * a.h_row_stride;
        if (a.norms)
          for (int r = 0; r < rows; ++r) {
            const float* xr = x + r * a.h_row_stride;
            a.norms[(c0 + r) * norms_stride] = std::sqrt(dot_lanes(xr, xr, d));
          }
#ifdef EMOVEC_BF16_DOT
        if (panels_path && round_rows) {
          project_rounded(x, a.h_row_stride, d, rows, a.probe_panels, K, 0, panels, a.scores + c0 * scores_stride,
                          scores_stride);
          continue;
        }
        if (panels_path) {
          project_widened(x, a.h_row_stride, d / 2, rows, a.probe_panels, K, 0, panels, a.scores + c0 * scores_stride,
                          scores_stride);
          continue;
        }
#endif
        project_rows_packed(x, a.h_row_stride, d, rows, packed_data, K, 0, panels, a.scores + c0 * scores_stride,
                            scores_stride);
      }
#else
      (void)r0, (void)r1;
#endif
    };
    // tiles [b0, b1) on this thread, with its own scratch
    auto tiles = [&](int64_t b0, int64_t b1) {
      std::vector<float> x((pad_rows ? kRowTile : tile) * dp, 0.0f);  // this tile's rows, fp32, centered, zero-padded
      std::vector<float> tile_scores(a.scores && pad_rows ? kRowTile * K : 0);
      std::vector<float> coef(A);
      std::vector<float> centered(C > 0 ? d : 0);  // scratch of the regulation
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row0 = b * tile;
        const int rows = static_cast<int>(std::min<int64_t>(tile, n - row0));
        prepare(row0, rows, x.data(), coef.data(), centered.data(), pad_rows);
        if (a.scores == nullptr) continue;
        if (pad_rows && !bf16_path) {  // the portable packed kernel: whole blocks of kPanelRows rows
          project_tile_packed(x.data(), dp, d, rows, packed_data, K, tile_scores.data());
          copy_rows(tile_scores.data(), rows, K, a.scores + row0 * scores_stride, scores_stride);
        } else {
          tile_dots(row0, x.data(), rows, 0, K, a.scores + row0 * scores_stride);
        }
      }
    };
    if (rows_as_stored && num_threads == 1) {
      stored_rows(0, n);
    } else if (rows_as_stored) {
#pragma omp parallel num_threads(num_threads)
      {
        const auto [t, T] = team_position();  // shares of whole blocks of 8 rows (the micro-kernel's), balanced
        const int64_t blocks = (n + 7) / 8;
        stored_rows(std::min(n, blocks * t / T * 8), std::min(n, blocks * (t + 1) / T * 8));
      }
    } else if (num_threads == 1) {  // no parallel region at all: even an inactive one costs a team's set-up
      tiles(0, num_tiles);
    } else {
#pragma omp parallel num_threads(num_threads)
      {
        const auto [t, T] = team_position();
        tiles(num_tiles * t / T, num_tiles * (t + 1) / T);  // contiguous shares, as schedule(static)
      }
    }
  }

  if (a.sums != nullptr) {
    bool bad_segment = false;  // rows with a segment outside [-1, num_segments) are never captured
    for (int64_t i = 0; i < n; ++i) bad_segment |= segment_out_of_range(a.segments[i], a.num_segments);
    if (bad_segment) report(a.errors, kSegmentOutOfRange);
    auto captured = [&](int64_t s) { return s >= 0 && s < a.num_segments; };
    constexpr int64_t kColumns = 256;
    const int64_t chunks = (d + kColumns - 1) / kColumns;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks > 1 && n > 64)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kColumns, j1 = std::min(d, j0 + kColumns);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = a.segments[i];
        if (!captured(s)) continue;
        const H* hr = h + i * a.h_row_stride;
        float* dst = a.sums + s * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += to_float(hr[j]);
      }
    }
    for (int64_t i = 0; i < n; ++i)
      if (captured(a.segments[i])) a.counts[a.segments[i]] += 1.0f;
  }
}

template <typename H>
void dispatch_weights(const SteerProjectArgs& a, int threads) {
  if (a.w_dtype == kFloat32) run<H, float>(a, threads);
  else run<H, H>(a, threads);
}

}  // namespace

int64_t packed_probes_floats(int64_t K, int64_t d) { return (K + kPanelWidth - 1) / kPanelWidth * d * kPanelWidth; }

void pack_probes_into(const float* probes, int64_t K, int64_t d, float* out) {
  const std::vector<float> packed = pack_probes(probes, d, K, d, 1);
  std::copy(packed.begin(), packed.end(), out);
}

std::vector<uint16_t> prepare_probe_panels(const SteerProjectArgs& a) {
#ifdef EMOVEC_BF16_DOT
  // fp32 rows with bf16 probes (widened as they load), or bf16 rows and probes without a center (rows as stored); fp32 probes
  // are never rounded here (a prepared call with them keeps the exact dots below the per-call packing's threshold)
  const bool fp32_rows = a.h_dtype == kFloat32 && a.w_dtype == kBFloat16;
  const bool stored_rows = a.h_dtype == kBFloat16 && a.w_dtype == kBFloat16 && a.center == nullptr;
  if (!(fp32_rows || stored_rows) || a.probes == nullptr || a.num_probes == 0) return {};
  std::vector<float> probes(a.num_probes * a.d);
  for (int64_t i = 0; i < a.num_probes * a.d; ++i)  // bf16 probes: exact (they round back to themselves)
    probes[i] = a.w_dtype == kBFloat16 ? to_float(static_cast<const bfloat16_t*>(a.probes)[i])
                                       : static_cast<const float*>(a.probes)[i];
  return pack_probes_bf16(probes.data(), a.d, a.num_probes, a.d, 1);
#else
  (void)a;
  return {};
#endif
}

double cpu_read_seconds(const void* data, int64_t bytes, int64_t repeats) {
  const uint64_t* words = static_cast<const uint64_t*>(data);
  const int64_t count = bytes / 8;
  double best = std::numeric_limits<double>::infinity();
  uint64_t seen = 0;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t x = 0;
#pragma omp simd reduction(^ : x)
    for (int64_t i = 0; i < count; ++i) x ^= words[i];
    const auto t1 = std::chrono::steady_clock::now();
    seen ^= x;
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  volatile uint64_t keep = seen;  // the reads must happen
  (void)keep;
  return best;
}

bool cpu_bf16_dot() {
#ifdef EMOVEC_BF16_DOT
  return true;
#else
  return false;
#endif
}

namespace {

int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads <= 0 ? omp_get_max_threads() : num_threads;
#else
  (void)num_threads;
  return 1;
#endif
}

// on checked arguments (dtype codes included): never throws for a bad argument
void dispatch(const SteerProjectArgs& a, int num_threads) {
  switch (a.h_dtype) {
    case kFloat32:
      if (a.w_dtype == kBFloat16) run<float, bfloat16_t>(a, num_threads);
      else run<float, float>(a, num_threads);
      break;
    case kFloat16: dispatch_weights<half_t>(a, num_threads); break;
    default: dispatch_weights<bfloat16_t>(a, num_threads); break;
  }
}

void check_h_dtype(const SteerProjectArgs& a) {
  if (a.h_dtype != kFloat32 && a.h_dtype != kFloat16 && a.h_dtype != kBFloat16)
    throw std::invalid_argument("emovec._C.steer_project: unknown h dtype code");
}

}  // namespace

void steer_project_cpu(const SteerProjectArgs& a, int num_threads) {
  check_args(a);
  check_h_dtype(a);
  dispatch(a, resolve_threads(num_threads));
}

void steer_project_cpu_many(const SteerProjectArgs* calls, int64_t count, int num_threads) {
  for (int64_t i = 0; i < count; ++i) {  // all checked before any runs: nothing throws inside the parallel region
    check_args(calls[i]);
    check_h_dtype(calls[i]);
  }
  num_threads = resolve_threads(num_threads);
  // a call per thread when the calls share out evenly enough; each call then runs the one-thread path, which sums
  // every score exactly as the call on any number of threads would (whole probe blocks per thread)
  if (num_threads > 1 && (count >= 2 * num_threads || (count >= num_threads && count % num_threads == 0))) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < count; ++i) dispatch(calls[i], 1);
  } else {
    for (int64_t i = 0; i < count; ++i) dispatch(calls[i], num_threads);
  }
}

}  // namespace emovec
