// kvloom._core: the only place pybind11 meets the core. Tensors come in through DLPack
// (dlpack_bridge), C++ errors become Python exceptions, the GIL is released around work.
// One file per area: pool, plans, cache, ops.
#include "bind.h"
#include "kvloom/kvloom.h"

namespace py = pybind11;
using namespace kvloom;

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvloom C++ core: block pool, paged per-head KV cache, eviction plans, CPU decode attention";
  m.attr("__version__") = KVLOOM_VERSION_STRING;
  py::register_exception<capacity_error>(m, "CapacityError", PyExc_RuntimeError);
  py::register_exception<concurrent_use_error>(m, "ConcurrencyError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
  bind::bind_pool(m);
  bind::bind_plans(m);
  bind::bind_cache(m);
  bind::bind_ops(m);
}
