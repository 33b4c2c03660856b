// The only pybind11 file: exposes the native kernels as mergekit_fast._C.
//
// Every pointer crosses as an integer address (tensor.data_ptr()), every CUDA stream as its raw
// handle (torch.cuda.current_stream().cuda_stream). Validation (device, dtype, shape,
// contiguity) happens once, in Python, before these are called. The GIL is released around
// every kernel so the engine's reader and writer threads keep running.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "routing/routing.h"
#include "slerp/slerp.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#if defined(MKF_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

#ifndef MKF_CUDA_ARCHS
#define MKF_CUDA_ARCHS ""
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mergekit_fast native kernels (C++ CPU, and CUDA when built with nvcc)";
  m.attr("with_cuda") = kWithCuda;

  // ---------------------------------------------------------------- SLERP (CPU)
  m.def(
      "slerp_sums_cpu",
      [](int dtype, uintptr_t a, uintptr_t b, int64_t n, int threads) {
        double s[3];
        {
          py::gil_scoped_release nogil;
          mkf::slerp_sums_cpu(dtype, ptr<const void>(a), ptr<const void>(b), n, s, threads);
        }
        return py::make_tuple(s[0], s[1], s[2]);
      },
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("n"), py::arg("threads") = 0);
  m.def(
      "slerp_cpu",
      [](int dtype, uintptr_t a, uintptr_t b, uintptr_t out, int64_t n, double t, double eps,
         double thr, int threads) {
        py::gil_scoped_release nogil;
        mkf::slerp_cpu(dtype, ptr<const void>(a), ptr<const void>(b), ptr<void>(out), n, t, eps,
                       thr, threads);
      },
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("t"),
      py::arg("eps"), py::arg("dot_threshold"), py::arg("threads") = 0);
  m.def(
      "slerp_batched_cpu",
      [](int dtype, int64_t count, uintptr_t a_ptrs, uintptr_t b_ptrs, uintptr_t out_ptrs,
         uintptr_t numels, uintptr_t ts, double eps, double thr, int threads) {
        py::gil_scoped_release nogil;
        mkf::slerp_batched_cpu(dtype, count, ptr<const uint64_t>(a_ptrs),
                               ptr<const uint64_t>(b_ptrs), ptr<const uint64_t>(out_ptrs),
                               ptr<const int64_t>(numels), ptr<const double>(ts), eps, thr,
                               threads);
      },
      py::arg("dtype"), py::arg("count"), py::arg("a_ptrs"), py::arg("b_ptrs"),
      py::arg("out_ptrs"), py::arg("numels"), py::arg("ts"), py::arg("eps"),
      py::arg("dot_threshold"), py::arg("threads") = 0);

#if defined(MKF_WITH_CUDA)
  // ---------------------------------------------------------------- SLERP (CUDA)
  m.def("slerp_cuda_workspace_bytes", &mkf::slerp_cuda_workspace_bytes, py::arg("n"));
  m.def(
      "slerp_cuda",
      [](int dtype, uintptr_t a, uintptr_t b, uintptr_t out, int64_t n, double t, double eps,
         double thr, uintptr_t workspace, uintptr_t stream) {
        py::gil_scoped_release nogil;
        mkf::slerp_cuda(dtype, ptr<const void>(a), ptr<const void>(b), ptr<void>(out), n, t, eps,
                        thr, ptr<void>(workspace), stream);
      },
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("t"),
      py::arg("eps"), py::arg("dot_threshold"), py::arg("workspace"), py::arg("stream"));
  m.def(
      "slerp_segments_cuda",
      [](int dtype, int64_t count, uintptr_t a_ptrs, uintptr_t b_ptrs, uintptr_t out_ptrs,
         uintptr_t numels, uintptr_t ts, double eps, double thr, uintptr_t stream) {
        py::gil_scoped_release nogil;
        mkf::slerp_segments_cuda(dtype, count, ptr<const uint64_t>(a_ptrs),
                                 ptr<const uint64_t>(b_ptrs), ptr<const uint64_t>(out_ptrs),
                                 ptr<const int64_t>(numels), ptr<const double>(ts), eps, thr,
                                 stream);
      },
      py::arg("dtype"), py::arg("count"), py::arg("a_ptrs"), py::arg("b_ptrs"),
      py::arg("out_ptrs"), py::arg("numels"), py::arg("ts"), py::arg("eps"),
      py::arg("dot_threshold"), py::arg("stream"));
#endif

  // ---------------------------------------------------------------- top-k routing
  // BEGIN routing bindings (owned by csrc/routing/; see routing/routing.h)
  // END routing bindings
}
