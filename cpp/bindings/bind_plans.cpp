// Eviction plans by name, and the prompt statistic that only FastGen uses.
#include "bind.h"
#include "kvloom/cache.h"
#include "plans/plan_impl.h"
#include "scores.h"

namespace kvloom {
namespace bind {

plan_params parse_plan_params(const py::dict& params) {
  plan_params p;
  for (auto item : params) {
    const std::string key = py::cast<std::string>(item.first);
    py::handle v = item.second;
    if (py::isinstance<py::str>(v)) p.set(key, py::cast<std::string>(v));
    else if (py::isinstance<py::bool_>(v)) p.set(key, py::cast<bool>(v) ? 1.0 : 0.0);
    else if (py::isinstance<py::int_>(v) || py::isinstance<py::float_>(v)) p.set(key, py::cast<double>(v));
    else p.set(key, int_list(v, key.c_str()));
  }
  return p;
}

void bind_plans(py::module_& m) {
  py::class_<head_plan, std::shared_ptr<head_plan>>(m, "Plan")
      .def_property_readonly("name", [](const head_plan& p) { return plan_describe(p); })
      .def_property_readonly("short_name", [](const head_plan& p) { return plan_short_name(p); })
      .def("__repr__", [](const head_plan& p) { return "<kvloom plan " + plan_describe(p) + ">"; });
  m.def(
      "make_plan",
      [](const std::string& name, const py::dict& params) {
        return std::const_pointer_cast<head_plan>(make_plan(name, parse_plan_params(params)));
      },
      py::arg("name"), py::arg("params") = py::dict());
  m.def("plan_names", &plan_names);
  m.attr("CLASS_SPECIAL") = kClassSpecial;
  m.attr("CLASS_PUNCT") = kClassPunct;
  m.def(
      "hybrid_recovery",
      [](cache& c, int layer, std::vector<int64_t> seqs, py::handle q, float scale, double r_frequent,
         int64_t local_window, bool accumulate) {
        borrowed bq = from_dlpack(q, "q");
        std::vector<double> out(seqs.size() * static_cast<size_t>(c.n_kv_heads()) * 4);
        {
          py::gil_scoped_release nogil;
          if (accumulate) accumulate_with_recovery(c, layer, seqs, bq.view, scale, r_frequent, local_window, out.data());
          else hybrid_recovery(c, layer, seqs, bq.view, scale, r_frequent, local_window, out.data());
        }
        return py::array_t<double>({static_cast<py::ssize_t>(seqs.size()), static_cast<py::ssize_t>(c.n_kv_heads()),
                                    static_cast<py::ssize_t>(4)}, out.data());
      },
      py::arg("cache"), py::arg("layer"), py::arg("seqs"), py::arg("q"), py::arg("scale"), py::arg("r_frequent"),
      py::arg("local_window"), py::arg("accumulate") = false,
      "FastGen profiling: [B, n_kv_heads, 4] attention mass kept by each nested hybrid (accumulate: first adds "
      "q's attention to the scores as accumulate_attention does, from the same pass)");
}

}  // namespace bind
}  // namespace kvloom
