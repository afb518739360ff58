// Internal to the bindings: the per-area registration functions and the argument parsers
// they share. pybind11 appears only under cpp/bindings/.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "dlpack_bridge.h"
#include "kvloom/attention.h"
#include "kvloom/plan.h"

namespace kvloom {
namespace bind {

namespace py = pybind11;

void bind_pool(py::module_& m);
void bind_plans(py::module_& m);
void bind_cache(py::module_& m);
void bind_ops(py::module_& m);

// "float32" / "fp16" / "bf16" ... -> dtype (TypeError otherwise).
dtype parse_dtype(const std::string& s);
// A 1-D integer tensor/array or a Python iterable of ints -> int32 values (range-checked).
std::vector<int32_t> int_list(const py::handle& obj, const char* what);
// A 1-D float tensor/array (or None) -> fp32 copy.
std::vector<float> float_list(const py::object& obj, const char* what);
// Rows of `seq` or `[seq | (seq, delta), ...]` -> cache segment views.
std::vector<std::vector<cache_segment>> parse_views(const py::handle& views);
// {"sinks": 4, "ords": [1, 2], "label": "x"} -> plan_params.
plan_params parse_plan_params(const py::dict& params);

}  // namespace bind
}  // namespace kvloom
