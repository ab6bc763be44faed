// pybind11 module soflow_fast._C: a thin layer over ema.h. All checking happens in ema.cpp, so the
// C++ test executable and Python see the same errors.
#include <torch/csrc/utils/pybind.h>

#include "ema.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Multi-tensor EMA updates and buffer copies for soflow_fast (CPU, and CUDA when built).";

  // Dtype/device mistakes read as TypeError in Python; pybind11 already turns the remaining
  // std::invalid_argument errors into ValueError.
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const soflow::ArgTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  // The GIL is dropped while the kernels run so that a data-loading thread keeps going meanwhile.
  m.def("ema_update_", &soflow::ema_update_, py::arg("emas"), py::arg("params"), py::arg("decay"),
        py::arg("fp64") = false, py::call_guard<py::gil_scoped_release>(),
        "In place: emas[i] = decay * emas[i] + (1 - decay) * params[i] for every i, in one pass.\n\n"
        "emas are float32 or float64, params float32 or bfloat16 (mixing allowed), same shapes, contiguous, one "
        "device. fp64=True computes in double precision even for float32 EMA buffers.");
  m.def("ema_update_multi_", &soflow::ema_update_multi_, py::arg("emas_per_decay"), py::arg("params"),
        py::arg("decays"), py::arg("fp64") = false, py::call_guard<py::gil_scoped_release>(),
        "Like ema_update_ for several decay rates: emas_per_decay[k][i] follows decays[k]. Each parameter is "
        "read once for all rates.");
  m.def("copy_", &soflow::copy_, py::arg("dst"), py::arg("src"), py::call_guard<py::gil_scoped_release>(),
        "In place: dst[i].copy_(src[i]) for every i in one parallel pass; dtypes and shapes must match.");
  m.def("cuda_built", &soflow::cuda_built, "Whether this build has the CUDA kernels.");
  m.def("cpu_isa", &soflow::cpu_isa, "Which CPU kernel copy runs: 'avx2' or 'default'.");
  m.def("set_cpu_isa", &soflow::set_cpu_isa, py::arg("isa"),
        "Select the CPU kernel copy ('avx2' or 'default'); for tests and benchmarks.");
}
