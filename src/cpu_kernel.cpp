// CPU kernel of the fused steer / project / capture op (OpenMP over row blocks).
//
// Per row: load h[i] to fp32, add table[slot[i]], project out the ablation directions, store back in h's
// dtype, then project the stored value (minus center) onto the probes in register blocks of
// kRows rows x kProbes probes x kLanes lanes, so the compiler vectorises the inner loop without -ffast-math.
// Capture runs as a second, column-parallel pass, so repeated segments need no atomics and sums are
// deterministic (rows are always added in order).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "steer_project.h"

namespace emovec {
namespace {

constexpr int kRows = 4;     // rows per register block
constexpr int kProbes = 4;   // probes per register block
constexpr int kLanes = 8;    // independent accumulators per dot (one AVX2 register of fp32)

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

// out[r][p] = dot(x[r], probe[p]) for kRows rows and P probes; x rows have stride `dp` (multiple of kLanes).
template <int P>
inline void dot_block(const float* x, int64_t dp, const float* const* probe, float out[kRows][kProbes]) {
  float acc[kRows][P][kLanes] = {};
  for (int64_t j = 0; j < dp; j += kLanes) {
    for (int r = 0; r < kRows; ++r)
      for (int p = 0; p < P; ++p)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[r][p][l] += x[r * dp + j + l] * probe[p][j + l];
  }
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < P; ++p) {
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += acc[r][p][l];
      out[r][p] = s;
    }
}

template <typename H, typename W>
void run(const SteerProjectArgs& a, int num_threads) {
  const int64_t n = a.n, d = a.d, K = a.num_probes, A = a.num_ablate;
  const int64_t dp = round_up(d, kLanes);
  H* h = static_cast<H*>(a.h);
  const bool edits = a.table != nullptr || A > 0;
  const bool projects = a.scores != nullptr || a.norms != nullptr;

  Fp32Rows<W> probes(a.probes, K, d, dp), ablate(a.ablate, A, d, d), table(a.table, a.table_rows, d, d),
      center(a.center, 1, d, d);

  if (edits || projects) {
    const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel num_threads(num_threads) if (blocks > 1)
    {
      std::vector<float> x(kRows * dp, 0.0f);  // this block's rows, fp32, centered, zero-padded
      std::vector<float> coef(A);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t row0 = b * kRows;
        const int rows = static_cast<int>(std::min<int64_t>(kRows, n - row0));
        for (int r = 0; r < kRows; ++r) {
          float* xr = x.data() + r * dp;
          if (r >= rows) { std::fill(xr, xr + dp, 0.0f); continue; }
          const int64_t i = row0 + r;
          H* hr = h + i * a.h_row_stride;
          for (int64_t j = 0; j < d; ++j) xr[j] = to_float(hr[j]);
          const bool active = a.slots == nullptr || a.slots[i] >= 0;
          if (edits && active) {
            if (table.data) {
              const float* t = table.data + a.slots[i] * d;
              for (int64_t j = 0; j < d; ++j) xr[j] += t[j];
            }
            for (int64_t q = 0; q < A; ++q) {  // all coefficients from the steered row, then subtract
              const float* u = ablate.data + q * d;
              float s = 0.0f;
              for (int64_t j = 0; j < d; ++j) s += xr[j] * u[j];
              coef[q] = s;
            }
            for (int64_t q = 0; q < A; ++q) {
              const float* u = ablate.data + q * d;
              for (int64_t j = 0; j < d; ++j) xr[j] -= coef[q] * u[j];
            }
            for (int64_t j = 0; j < d; ++j) {  // store, and keep exactly what was stored
              hr[j] = from_float<H>(xr[j]);
              xr[j] = to_float(hr[j]);
            }
          }
          if (center.data)
            for (int64_t j = 0; j < d; ++j) xr[j] -= center.data[j];
          if (a.norms) {
            float s = 0.0f;
            for (int64_t j = 0; j < d; ++j) s += xr[j] * xr[j];
            a.norms[i] = std::sqrt(s);
          }
        }
        if (a.scores == nullptr) continue;
        float out[kRows][kProbes];
        const float* p[kProbes];
        int64_t k = 0;
        for (; k + kProbes <= K; k += kProbes) {
          for (int q = 0; q < kProbes; ++q) p[q] = probes.data + (k + q) * probes.stride;
          dot_block<kProbes>(x.data(), dp, p, out);
          for (int r = 0; r < rows; ++r)
            for (int q = 0; q < kProbes; ++q) a.scores[(row0 + r) * K + k + q] = out[r][q];
        }
        for (; k < K; ++k) {
          p[0] = probes.data + k * probes.stride;
          dot_block<1>(x.data(), dp, p, out);
          for (int r = 0; r < rows; ++r) a.scores[(row0 + r) * K + k] = out[r][0];
        }
      }
    }
  }

  if (a.sums != nullptr) {
    constexpr int64_t kColumns = 256;
    const int64_t chunks = (d + kColumns - 1) / kColumns;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks > 1 && n > 64)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j0 = c * kColumns, j1 = std::min(d, j0 + kColumns);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = a.segments[i];
        if (s < 0) continue;
        const H* hr = h + i * a.h_row_stride;
        float* dst = a.sums + s * d;
        for (int64_t j = j0; j < j1; ++j) dst[j] += to_float(hr[j]);
      }
    }
    for (int64_t i = 0; i < n; ++i)
      if (a.segments[i] >= 0) a.counts[a.segments[i]] += 1.0f;
  }
}

template <typename H>
void dispatch_weights(const SteerProjectArgs& a, int threads) {
  if (a.w_dtype == kFloat32) run<H, float>(a, threads);
  else run<H, H>(a, threads);
}

}  // namespace

void steer_project_cpu(const SteerProjectArgs& a, int num_threads) {
  check_args(a);
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
  switch (a.h_dtype) {
    case kFloat32: run<float, float>(a, num_threads); break;
    case kFloat16: dispatch_weights<half_t>(a, num_threads); break;
    case kBFloat16: dispatch_weights<bfloat16_t>(a, num_threads); break;
    default: throw std::invalid_argument("emovec._C.steer_project: unknown h dtype code");
  }
}

}  // namespace emovec
