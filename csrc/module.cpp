// pybind11 module emovec._C: binds the C++ core (src/) to Python. Pointers, sizes, strides, dtype codes and
// the CUDA stream cross as integers; no torch header is included. Nothing else lives here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../src/steer_project.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

emovec::SteerProjectArgs make_args(std::uintptr_t h, int64_t n, int64_t d, int64_t h_row_stride, int h_dtype,
                                   int w_dtype, std::uintptr_t slots, std::uintptr_t table, int64_t table_rows,
                                   std::uintptr_t ablate, int64_t num_ablate, std::uintptr_t probes, int64_t num_probes,
                                   std::uintptr_t center, std::uintptr_t scores, std::uintptr_t norms,
                                   std::uintptr_t segments, std::uintptr_t sums, std::uintptr_t counts,
                                   int64_t num_segments, std::uintptr_t errors, std::uintptr_t clamp,
                                   int64_t num_clamp, std::uintptr_t bounds, bool relative_bounds,
                                   std::uintptr_t corrections) {
  emovec::SteerProjectArgs a;
  a.h = as_pointer<void>(h); a.n = n; a.d = d; a.h_row_stride = h_row_stride; a.h_dtype = h_dtype;
  a.w_dtype = w_dtype;
  a.slots = as_pointer<const int64_t>(slots);
  a.table = as_pointer<const void>(table); a.table_rows = table_rows;
  a.ablate = as_pointer<const void>(ablate); a.num_ablate = num_ablate;
  a.probes = as_pointer<const void>(probes); a.num_probes = num_probes;
  a.center = as_pointer<const void>(center);
  a.scores = as_pointer<float>(scores); a.norms = as_pointer<float>(norms);
  a.segments = as_pointer<const int64_t>(segments);
  a.sums = as_pointer<float>(sums); a.counts = as_pointer<float>(counts); a.num_segments = num_segments;
  a.errors = as_pointer<int32_t>(errors);
  a.clamp = as_pointer<const void>(clamp); a.num_clamp = num_clamp;
  a.bounds = as_pointer<const float>(bounds); a.relative_bounds = relative_bounds;
  a.corrections = as_pointer<float>(corrections);
  return a;
}

// A CPU call whose weights and sizes are fixed (the runtime's monitor at one layer): built once, then run with only
// what changes per call (h, its rows, the outputs' addresses), so a call crosses from Python with six integers
// instead of twenty-seven. The caller keeps every tensor it named alive.
struct CpuCall {
  emovec::SteerProjectArgs args;
  std::vector<uint16_t> panels;     // fp32 rows with bf16 probes: the probes packed once for vdpbf16ps
  std::vector<float> panels_fp32;   // fp32 probes: packed at the first call of kCpuPackedMinRows rows or more
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "emovec compiled core: the fused steer/project/capture op (CPU, and CUDA when compiled)";
  py::register_exception<std::invalid_argument>(m, "ArgumentError", PyExc_ValueError);


  m.def(
      "steer_project_cpu",
      [](std::uintptr_t h, int64_t n, int64_t d, int64_t stride, int h_dtype, int w_dtype, std::uintptr_t slots,
         std::uintptr_t table, int64_t table_rows, std::uintptr_t ablate, int64_t num_ablate, std::uintptr_t probes,
         int64_t num_probes, std::uintptr_t center, std::uintptr_t scores, std::uintptr_t norms,
         std::uintptr_t segments, std::uintptr_t sums, std::uintptr_t counts, int64_t num_segments, std::uintptr_t errors,
         std::uintptr_t clamp, int64_t num_clamp, std::uintptr_t bounds, bool relative_bounds,
         std::uintptr_t corrections, int threads) {
        auto a = make_args(h, n, d, stride, h_dtype, w_dtype, slots, table, table_rows, ablate, num_ablate, probes,
                           num_probes, center, scores, norms, segments, sums, counts, num_segments, errors, clamp,
                           num_clamp, bounds, relative_bounds, corrections);
        py::gil_scoped_release release;
        emovec::steer_project_cpu(a, threads);
      },
      "Fused op on host memory (addresses as integers, 0 = absent).");

  py::class_<CpuCall>(m, "CpuCall", "A prepared CPU call of the fused op: fixed weights, per-call rows and outputs.")
      .def(py::init([](int64_t d, int h_dtype, int w_dtype, std::uintptr_t probes, int64_t num_probes,
                       std::uintptr_t center) {
             CpuCall call;
             call.args = make_args(0, 0, d, d, h_dtype, w_dtype, 0, 0, 0, 0, 0, probes, num_probes, center, 0, 0, 0,
                                   0, 0, 0, 0, 0, 0, 0, false, 0);
             emovec::check_args(call.args);
             call.panels = emovec::prepare_probe_panels(call.args);
             return call;
           }),
           py::arg("d"), py::arg("h_dtype"), py::arg("w_dtype"), py::arg("probes"), py::arg("num_probes"),
           py::arg("center"))
      .def(
          "run",
          [](CpuCall& call, std::uintptr_t h, int64_t n, int64_t stride, std::uintptr_t scores,
             std::uintptr_t norms, int threads, int64_t scores_stride, int64_t norms_stride) {
            emovec::SteerProjectArgs a = call.args;
            if (n >= emovec::kCpuPackedMinRows && scores != 0 && call.panels.empty() && call.panels_fp32.empty() &&
                a.h_dtype == emovec::kFloat32 && a.w_dtype == emovec::kFloat32 && a.num_probes > 0) {
              // fp32 rows and probes (bf16 rows keep their own vdpbf16ps panels); under the GIL: one thread packs
              call.panels_fp32.resize(emovec::packed_probes_floats(a.num_probes, a.d));
              emovec::pack_probes_into(static_cast<const float*>(a.probes), a.num_probes, a.d, call.panels_fp32.data());
            }
            a.probe_panels = call.panels.empty() ? nullptr : call.panels.data();
            a.probe_panels_fp32 = call.panels_fp32.empty() ? nullptr : call.panels_fp32.data();
            a.h = as_pointer<void>(h); a.n = n; a.h_row_stride = stride;
            a.scores = as_pointer<float>(scores); a.norms = as_pointer<float>(norms);
            a.scores_row_stride = scores_stride; a.norms_stride = norms_stride;
            if (n == 0) return;
            py::gil_scoped_release release;
            emovec::steer_project_cpu(a, threads);
          },
          "Project n rows of h (row stride `stride`) onto the probes: row i's scores at scores + i * scores_stride "
          "floats and its norm at norms + i * norms_stride floats (0: contiguous).",
          py::arg("h"), py::arg("n"), py::arg("stride"), py::arg("scores"), py::arg("norms"), py::arg("threads"),
          py::arg("scores_stride") = 0, py::arg("norms_stride") = 0);

  m.def(
      "steer_project_cuda",
      [](std::uintptr_t h, int64_t n, int64_t d, int64_t stride, int h_dtype, int w_dtype, std::uintptr_t slots,
         std::uintptr_t table, int64_t table_rows, std::uintptr_t ablate, int64_t num_ablate, std::uintptr_t probes,
         int64_t num_probes, std::uintptr_t center, std::uintptr_t scores, std::uintptr_t norms,
         std::uintptr_t segments, std::uintptr_t sums, std::uintptr_t counts, int64_t num_segments,
         std::uintptr_t errors, std::uintptr_t clamp, int64_t num_clamp, std::uintptr_t bounds,
         bool relative_bounds, std::uintptr_t corrections, std::intptr_t stream) {
        auto a = make_args(h, n, d, stride, h_dtype, w_dtype, slots, table, table_rows, ablate, num_ablate, probes,
                           num_probes, center, scores, norms, segments, sums, counts, num_segments, errors, clamp,
                           num_clamp, bounds, relative_bounds, corrections);
        emovec::steer_project_cuda(a, stream);
      },
      "Fused op on device memory, one or two launches on `stream` (cudaStream_t as an integer).");

  m.def("cuda_compiled", &emovec::cuda_compiled, "Whether CUDA kernels were compiled into this module.");
  m.def("cuda_architectures", &emovec::cuda_architectures, "CUDA architectures compiled, e.g. '80,90'.");
  m.def("cpu_bf16_dot", &emovec::cpu_bf16_dot,
        "Whether the CPU kernel dots bf16 rows with AVX-512 bf16 instructions (probes rounded to bf16).");
  m.def("cuda_device_count", &emovec::cuda_device_count, "CUDA devices visible (0 without a driver).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
