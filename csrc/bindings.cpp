// The only pybind11 file: exposes the native kernels as mergekit_fast._C.
//
// Every pointer crosses as an integer address (tensor.data_ptr(), or address() of a buffer such
// as a mapped file), every CUDA stream as its raw handle (torch.cuda.current_stream().cuda_stream).
// Validation (device, dtype, shape, contiguity) happens once, in Python, before these are called. The GIL is released around
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

  // The address of any object with the buffer protocol (a read-only mmap included), for callers
  // without torch. The caller keeps the object, and so the memory, alive while it uses the address.
  m.def(
      "address",
      [](py::buffer b) {
        py::buffer_info info = b.request();
        return reinterpret_cast<uintptr_t>(info.ptr);
      },
      py::arg("buffer"));

  // ---------------------------------------------------------------- SLERP (CPU)
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
  m.def(
      "topk_routing_cpu",
      [](int dtype, uintptr_t logits, uintptr_t bias, uintptr_t weights, uintptr_t ids, int64_t T,
         int64_t E, int64_t k, int scoring, bool renormalize, int64_t num_groups,
         int64_t topk_groups, int group_score, float scaling, int threads) {
        py::gil_scoped_release nogil;
        mkf::topk_routing_cpu(dtype, ptr<const void>(logits), ptr<const float>(bias),
                              ptr<float>(weights), ptr<int32_t>(ids), T, E, k, scoring,
                              renormalize, num_groups, topk_groups, group_score, scaling,
                              threads);
      },
      py::arg("dtype"), py::arg("logits"), py::arg("bias"), py::arg("weights"), py::arg("ids"),
      py::arg("T"), py::arg("E"), py::arg("k"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("num_groups"), py::arg("topk_groups"), py::arg("group_score"), py::arg("scaling"),
      py::arg("threads") = 0);
  m.def(
      "routing_counts_cpu",
      [](uintptr_t ids, int64_t n_slots, int64_t E, uintptr_t counts, uintptr_t order,
         int threads) {
        py::gil_scoped_release nogil;
        mkf::routing_counts_cpu(ptr<const int32_t>(ids), n_slots, E, ptr<int32_t>(counts),
                                ptr<int32_t>(order), threads);
      },
      py::arg("ids"), py::arg("n_slots"), py::arg("E"), py::arg("counts"), py::arg("order"),
      py::arg("threads") = 0);
#if defined(MKF_WITH_CUDA)
  m.attr("routing_cuda_max_experts") = mkf::kRoutingCudaMaxExperts;
  m.attr("routing_cuda_max_groups") = mkf::kRoutingCudaMaxGroups;
  m.def(
      "topk_routing_cuda",
      [](int dtype, uintptr_t logits, uintptr_t bias, uintptr_t weights, uintptr_t ids, int64_t T,
         int64_t E, int64_t k, int scoring, bool renormalize, int64_t num_groups,
         int64_t topk_groups, int group_score, float scaling, uintptr_t stream) {
        py::gil_scoped_release nogil;
        mkf::topk_routing_cuda(dtype, ptr<const void>(logits), ptr<const float>(bias),
                               ptr<float>(weights), ptr<int32_t>(ids), T, E, k, scoring,
                               renormalize, num_groups, topk_groups, group_score, scaling,
                               stream);
      },
      py::arg("dtype"), py::arg("logits"), py::arg("bias"), py::arg("weights"), py::arg("ids"),
      py::arg("T"), py::arg("E"), py::arg("k"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("num_groups"), py::arg("topk_groups"), py::arg("group_score"), py::arg("scaling"),
      py::arg("stream"));
  m.def("routing_counts_cuda_workspace_bytes", &mkf::routing_counts_cuda_workspace_bytes,
        py::arg("n_slots"), py::arg("E"));
  m.def(
      "routing_counts_cuda",
      [](uintptr_t ids, int64_t n_slots, int64_t E, uintptr_t counts, uintptr_t order,
         uintptr_t workspace, uintptr_t stream) {
        py::gil_scoped_release nogil;
        mkf::routing_counts_cuda(ptr<const int32_t>(ids), n_slots, E, ptr<int32_t>(counts),
                                 ptr<int32_t>(order), ptr<void>(workspace), stream);
      },
      py::arg("ids"), py::arg("n_slots"), py::arg("E"), py::arg("counts"), py::arg("order"),
      py::arg("workspace"), py::arg("stream"));
#endif
  // END routing bindings
}
