// pybind11 module emovec._C: binds the C++ core (src/) to Python. Pointers, sizes, strides, dtype codes and
// the CUDA stream cross as integers; no torch header is included. Nothing else lives here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>

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

  // the arguments of a run of n rows; packs the fp32 panels at the first run of kCpuPackedMinRows rows or more (fp32
  // rows and probes; bf16 rows keep their own vdpbf16ps panels). One thread packs (a group runs without the GIL);
  // packed panels never change again, so the kernels read them unlocked.
  emovec::SteerProjectArgs with(std::uintptr_t h, int64_t n, int64_t stride, std::uintptr_t scores,
                                std::uintptr_t norms, int64_t scores_stride, int64_t norms_stride) {
    static std::mutex packing;
    std::lock_guard<std::mutex> lock(packing);
    emovec::SteerProjectArgs a = args;
    if (n >= emovec::kCpuPackedMinRows && scores != 0 && panels.empty() && panels_fp32.empty() &&
        a.h_dtype == emovec::kFloat32 && a.w_dtype == emovec::kFloat32 && a.num_probes > 0) {
      panels_fp32.resize(emovec::packed_probes_floats(a.num_probes, a.d));
      emovec::pack_probes_into(static_cast<const float*>(a.probes), a.num_probes, a.d, panels_fp32.data());
    }
    a.probe_panels = panels.empty() ? nullptr : panels.data();
    a.probe_panels_fp32 = panels_fp32.empty() ? nullptr : panels_fp32.data();
    a.h = as_pointer<void>(h); a.n = n; a.h_row_stride = stride;
    a.scores = as_pointer<float>(scores); a.norms = as_pointer<float>(norms);
    a.scores_row_stride = scores_stride; a.norms_stride = norms_stride;
    return a;
  }
};

// A CPU steering call whose table is fixed (a layer's steering rows): run with only the rows and their slots, so a
// decode step's steering crosses from Python with five integers. The caller keeps the table alive.
struct CpuSteer {
  emovec::SteerProjectArgs args;
};

// The prepared calls of a monitor's layers at decode steps, run together. Each layer's call copies its few rows (and
// remembers where their scores go); a step's last layer runs every layer's dots in one parallel region, a layer per
// thread (steer_project_cpu_many). One call per layer per step costs a fork and a join of the threads each time,
// about what a layer's dots cost at one row; the copies cost a few hundred bytes per layer.
// With a window of W rows, the rows of several steps are kept (up to W per layer) and run in one call per layer when
// the next step would not fit (or at flush): the probes, which the model's weights evict from the caches every step,
// are then read once per window instead of once per step, and several rows share each probe load. Each layer's
// scores are those of one call on the window's rows, copied to where each step's rows' scores go.
// A group's state is guarded by its mutex, taken without the GIL (a flush computes without it, so a record read on
// one thread while another thread's forward pass keeps rows never sees half a window).
struct CpuLayers {
  struct Piece {  // one run's rows of a layer: where their scores and norms go
    int64_t n;
    std::uintptr_t scores, norms;
    int64_t scores_stride, norms_stride;
  };
  std::vector<py::object> owners;  // the CpuCall objects: their panels must outlive this group
  std::vector<CpuCall*> calls;
  std::vector<std::vector<unsigned char>> rows;  // each layer's kept rows, copied contiguously
  std::vector<std::vector<Piece>> pieces;        // each layer's kept runs, in order
  std::vector<int64_t> kept;                     // each layer's kept rows
  std::vector<emovec::SteerProjectArgs> direct;  // a layer whose rows were not copied (the last, without a window)
  std::vector<bool> is_direct;
  std::vector<std::vector<float>> scratch;  // a window's scores and norms per layer, before they are copied out
  int64_t window = 0;
  int threads = 0;  // of the last run, for a flush without its own
  std::unique_ptr<std::mutex> mutex = std::make_unique<std::mutex>();

  int64_t element(size_t i) const { return calls[i]->args.h_dtype == emovec::kFloat32 ? 4 : 2; }

  // with the mutex held and the GIL released
  void flush(int num_threads) {
    // the layers' arguments first, then the dots, then the windows' scores copied out; the kept state is cleared
    // before anything runs
    std::vector<emovec::SteerProjectArgs> ready;
    struct Scattered { size_t layer; int64_t rows; std::vector<Piece> pieces; };
    std::vector<Scattered> scattered;
    for (size_t i = 0; i < calls.size(); ++i) {
      if (pieces[i].empty()) continue;
      if (is_direct[i]) {
        ready.push_back(direct[i]);
      } else if (pieces[i].size() == 1) {
        const Piece& p = pieces[i][0];
        emovec::SteerProjectArgs a = calls[i]->with(reinterpret_cast<std::uintptr_t>(rows[i].data()), p.n,
                                                    calls[i]->args.d, p.scores, p.norms, p.scores_stride,
                                                    p.norms_stride);
        ready.push_back(a);
      } else {
        const int64_t K = calls[i]->args.num_probes;
        scratch[i].resize(kept[i] * (K + 1));
        float* s = scratch[i].data();
        emovec::SteerProjectArgs a =
            calls[i]->with(reinterpret_cast<std::uintptr_t>(rows[i].data()), kept[i], calls[i]->args.d,
                           reinterpret_cast<std::uintptr_t>(s), reinterpret_cast<std::uintptr_t>(s + kept[i] * K),
                           0, 0);
        ready.push_back(a);
        scattered.push_back({i, kept[i], std::move(pieces[i])});
      }
    }
    for (size_t i = 0; i < calls.size(); ++i) {
      pieces[i].clear();
      kept[i] = 0;
      is_direct[i] = false;
    }
    if (ready.empty()) return;
    emovec::steer_project_cpu_many(ready.data(), static_cast<int64_t>(ready.size()),
                                   num_threads > 0 ? num_threads : threads);
    for (const Scattered& window_rows : scattered) {
      const int64_t K = calls[window_rows.layer]->args.num_probes;
      const float* s = scratch[window_rows.layer].data();
      const float* norms = s + window_rows.rows * K;  // the window's norms follow its scores in the scratch
      int64_t row = 0;
      for (const Piece& p : window_rows.pieces) {
        const int64_t ss = p.scores_stride > 0 ? p.scores_stride : K, ns = p.norms_stride > 0 ? p.norms_stride : 1;
        for (int64_t r = 0; r < p.n; ++r, ++row) {
          if (p.scores != 0) std::memcpy(as_pointer<float>(p.scores) + r * ss, s + row * K, K * sizeof(float));
          if (p.norms != 0) as_pointer<float>(p.norms)[r * ns] = norms[row];
        }
      }
    }
  }
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
                       std::uintptr_t center, bool bf16_dots) {
             CpuCall call;
             call.args = make_args(0, 0, d, d, h_dtype, w_dtype, 0, 0, 0, 0, 0, probes, num_probes, center, 0, 0, 0,
                                   0, 0, 0, 0, 0, 0, 0, false, 0);
             call.args.round_rows_bf16 = bf16_dots;
             emovec::check_args(call.args);
             call.panels = emovec::prepare_probe_panels(call.args);
             return call;
           }),
           py::arg("d"), py::arg("h_dtype"), py::arg("w_dtype"), py::arg("probes"), py::arg("num_probes"),
           py::arg("center"), py::arg("bf16_dots") = false,
           "bf16_dots: fp32 rows with bf16 probes only; each row is rounded to bf16 before its dots (vdpbf16ps where "
           "the CPU has AVX-512 bf16), its norm taken exactly.")
      .def_property_readonly("bf16_dots", [](const CpuCall& call) { return call.args.round_rows_bf16; })
      .def(
          "run",
          [](CpuCall& call, std::uintptr_t h, int64_t n, int64_t stride, std::uintptr_t scores,
             std::uintptr_t norms, int threads, int64_t scores_stride, int64_t norms_stride) {
            if (n == 0) return;
            const emovec::SteerProjectArgs a = call.with(h, n, stride, scores, norms, scores_stride, norms_stride);
            py::gil_scoped_release release;
            emovec::steer_project_cpu(a, threads);
          },
          "Project n rows of h (row stride `stride`) onto the probes: row i's scores at scores + i * scores_stride "
          "floats and its norm at norms + i * norms_stride floats (0: contiguous).",
          py::arg("h"), py::arg("n"), py::arg("stride"), py::arg("scores"), py::arg("norms"), py::arg("threads"),
          py::arg("scores_stride") = 0, py::arg("norms_stride") = 0);

  py::class_<CpuSteer>(m, "CpuSteer", "A prepared CPU steering call: a fixed table, per-call rows and slots.")
      .def(py::init([](int64_t d, int h_dtype, int w_dtype, std::uintptr_t table, int64_t table_rows) {
             if (table == 0) throw std::invalid_argument("emovec._C.CpuSteer: the table is null");
             CpuSteer call;
             // checked as a call with slots (any non-null address: the slots come with each run)
             call.args = make_args(0, 0, d, d, h_dtype, w_dtype, table, table, table_rows, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                   0, 0, 0, 0, 0, 0, false, 0);
             emovec::check_args(call.args);
             call.args.slots = nullptr;
             return call;
           }),
           py::arg("d"), py::arg("h_dtype"), py::arg("w_dtype"), py::arg("table"), py::arg("table_rows"))
      .def(
          "run",
          [](CpuSteer& call, std::uintptr_t h, int64_t n, int64_t stride, std::uintptr_t slots, int threads,
             std::uintptr_t errors) {
            if (n == 0) return;
            if (h == 0 || slots == 0) throw std::invalid_argument("emovec._C.CpuSteer.run: null rows or slots");
            if (stride < call.args.d && n > 1)
              throw std::invalid_argument("emovec._C.CpuSteer.run: the row stride must be >= d");
            emovec::SteerProjectArgs a = call.args;
            a.h = as_pointer<void>(h); a.n = n; a.h_row_stride = stride;
            a.slots = as_pointer<const int64_t>(slots);
            a.errors = as_pointer<int32_t>(errors);
            py::gil_scoped_release release;
            emovec::steer_project_cpu(a, threads);
          },
          "Add table[slots[i]] to row i of h (n rows, row stride `stride`; slot -1: untouched; out of range: "
          "untouched, and flagged in the int32 at `errors` when given).",
          py::arg("h"), py::arg("n"), py::arg("stride"), py::arg("slots"), py::arg("threads"), py::arg("errors") = 0);

  py::class_<CpuLayers>(m, "CpuLayers",
                        "Prepared CPU calls of several layers, run together when the last layer's rows arrive (or, "
                        "with a window, when the next step's rows would not fit in it).")
      .def(py::init([](py::list calls, int64_t window) {
             CpuLayers group;
             for (py::handle item : calls) {
               group.owners.push_back(py::reinterpret_borrow<py::object>(item));
               group.calls.push_back(item.cast<CpuCall*>());
             }
             if (group.calls.empty()) throw std::invalid_argument("emovec._C.CpuLayers: no calls");
             if (window < 0) throw std::invalid_argument("emovec._C.CpuLayers: window must be >= 0 rows");
             const size_t count = group.calls.size();
             group.rows.resize(count);
             group.pieces.resize(count);
             group.kept.assign(count, 0);
             group.direct.resize(count);
             group.is_direct.assign(count, false);
             group.scratch.resize(count);
             group.window = window;
             return group;
           }),
           py::arg("calls"), py::arg("window") = 0)
      .def(
          "run",
          [](CpuLayers& group, int64_t position, std::uintptr_t h, int64_t n, int64_t stride, std::uintptr_t scores,
             std::uintptr_t norms, int threads, int64_t scores_stride, int64_t norms_stride, std::uintptr_t plus,
             int64_t plus_stride) {
            const int64_t count = static_cast<int64_t>(group.calls.size());
            if (position < 0 || position >= count)
              throw std::invalid_argument("emovec._C.CpuLayers.run: position " + std::to_string(position) +
                                          " outside [0, " + std::to_string(count) + ")");
            if (n < 0) throw std::invalid_argument("emovec._C.CpuLayers.run: n must be >= 0");
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(*group.mutex);
            group.threads = threads;
            const bool last = position + 1 == count;
            if (n > 0) {
              CpuCall& call = *group.calls[position];
              const int64_t d = call.args.d;
              // the rows are read here (copied), before the kernel's own checks
              if (h == 0) throw std::invalid_argument("emovec._C.CpuLayers.run: the rows are null");
              if (n > 1 && stride < d)
                throw std::invalid_argument("emovec._C.CpuLayers.run: the row stride must be >= d");
              if (plus != 0 && n > 1 && plus_stride < d)
                throw std::invalid_argument("emovec._C.CpuLayers.run: plus_stride must be >= d (rows of `plus`)");
              if (plus != 0 && call.args.h_dtype != emovec::kFloat32)
                throw std::invalid_argument("emovec._C.CpuLayers.run: `plus` needs fp32 rows; add them first");
              std::vector<unsigned char>& copy = group.rows[position];
              const int64_t element = group.element(position), width = d * element;
              const size_t offset = static_cast<size_t>(group.kept[position] * width);
              if (plus != 0) {  // the rows are h + plus (a layer output split in two, as vLLM's): summed in the copy
                copy.resize(offset + n * width);
                float* out = reinterpret_cast<float*>(copy.data() + offset);
                for (int64_t r = 0; r < n; ++r) {
                  const float* x = as_pointer<const float>(h) + r * stride;
                  const float* y = as_pointer<const float>(plus) + r * plus_stride;
                  float* o = out + r * d;
                  for (int64_t j = 0; j < d; ++j) o[j] = x[j] + y[j];  // what torch.add writes, bit for bit
                }
              } else if (!last || group.window > 0) {
                // copy the rows: the model may reuse their memory before the last layer (or the window's end)
                copy.resize(offset + n * width);
                const int64_t row_bytes = stride * element;
                for (int64_t r = 0; r < n; ++r)
                  std::memcpy(copy.data() + offset + r * width, as_pointer<unsigned char>(h) + r * row_bytes, width);
              } else {  // the last layer without a window: its call reads the rows where they are
                group.direct[position] = call.with(h, n, stride, scores, norms, scores_stride, norms_stride);
                group.is_direct[position] = true;
              }
              group.pieces[position].push_back({n, scores, norms, scores_stride, norms_stride});
              group.kept[position] += n;
            }
            // a step's last layer runs the kept layers, unless the window holds another step of as many rows
            if (last && (group.window == 0 || group.kept[position] + std::max<int64_t>(n, 1) > group.window))
              group.flush(threads);
          },
          "Layer `position`'s rows (CpuCall.run's arguments): copied and kept. The last position's call runs every "
          "kept layer's projection together; with a window of W rows it does so only when the kept rows plus another "
          "n would pass W (so the outputs of every kept run must still exist until then, or until flush). With "
          "`plus` (fp32 rows only) the rows projected are h + plus, row i of plus at plus + i * plus_stride floats, "
          "summed into the copy.",
          py::arg("position"), py::arg("h"), py::arg("n"), py::arg("stride"), py::arg("scores"), py::arg("norms"),
          py::arg("threads"), py::arg("scores_stride") = 0, py::arg("norms_stride") = 0, py::arg("plus") = 0,
          py::arg("plus_stride") = 0)
      .def("flush", [](CpuLayers& group, int threads) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> lock(*group.mutex);
             group.flush(threads);
           }, py::arg("threads") = 0,
           "Run the kept layers now (a step that stopped before the last layer, or a window not yet full): their "
           "outputs must still exist.")
      .def_property_readonly("pending", [](const CpuLayers& group) {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(*group.mutex);
        int64_t count = 0;
        for (const auto& p : group.pieces) count += !p.empty();
        return count;
      }, "Layers whose rows are kept, waiting for the last layer (or the window's end).")
      .def_property_readonly("kept_rows", [](const CpuLayers& group) {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(*group.mutex);
        return *std::max_element(group.kept.begin(), group.kept.end());
      }, "The most rows any layer keeps now.")
      .def_readonly("window", &CpuLayers::window, "Rows per layer kept across runs before they run (0: none).");

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
  m.def(
      "cpu_read_seconds",
      [](std::uintptr_t data, int64_t bytes, int64_t repeats) {
        if (data == 0 || bytes < 8 || repeats < 1)
          throw std::invalid_argument("emovec._C.cpu_read_seconds: needs an address, at least 8 bytes, 1 repeat");
        py::gil_scoped_release release;
        return emovec::cpu_read_seconds(as_pointer<const void>(data), bytes, repeats);
      },
      "Best of `repeats` timed reads of `bytes` bytes at address `data` on this thread, in seconds (benchmarks: the "
      "time to read a kernel's operands once).",
      py::arg("data"), py::arg("bytes"), py::arg("repeats"));
  m.def("cuda_device_count", &emovec::cuda_device_count, "CUDA devices visible (0 without a driver).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
