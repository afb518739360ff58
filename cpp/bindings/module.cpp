// kvloom._core: the only place pybind11 meets the core. Tensors come in through DLPack
// (dlpack_bridge), C++ errors become Python exceptions, the GIL is released around work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dlpack_bridge.h"
#include "kvloom/attention.h"
#include "kvloom/block_pool.h"
#include "kvloom/cache.h"
#include "kvloom/policy.h"
#ifdef KVLOOM_WITH_CUDA
#include "kvloom/cuda.h"
#endif

namespace py = pybind11;
using namespace kvloom;
using bind::borrowed;
using bind::from_dlpack;

namespace {

dtype parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "f32") return dtype::f32;
  if (s == "float16" || s == "fp16" || s == "f16" || s == "half") return dtype::f16;
  if (s == "bfloat16" || s == "bf16") return dtype::bf16;
  throw type_error("unknown KV dtype '" + s + "'; use float32, float16 or bfloat16");
}

std::vector<int32_t> int_list(const py::handle& obj, const char* what) {
  if (py::hasattr(obj, "__dlpack__")) {
    borrowed b = from_dlpack(obj, what);
    if (b.view.ndim != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
    std::vector<int32_t> out(static_cast<size_t>(b.view.shape[0]));
    for (size_t i = 0; i < out.size(); ++i) {
      const int64_t idx = static_cast<int64_t>(i);
      if (b.view.type == dtype::i32) out[i] = *static_cast<const int32_t*>(b.view.at(&idx));
      else if (b.view.type == dtype::i64) {
        const int64_t x = *static_cast<const int64_t*>(b.view.at(&idx));
        if (x < INT32_MIN || x > INT32_MAX) throw std::out_of_range(std::string(what) + ": value out of int32 range");
        out[i] = static_cast<int32_t>(x);
      } else throw type_error(std::string(what) + " must hold integers");
    }
    return out;
  }
  std::vector<int32_t> out;
  for (auto x : py::iter(obj)) {
    const int64_t v = py::cast<int64_t>(x);
    if (v < INT32_MIN || v > INT32_MAX) throw std::out_of_range(std::string(what) + ": value out of int32 range");
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

// inv_freq (any float tensor/array or None) -> contiguous fp32 copy.
std::vector<float> float_list(const py::object& obj, const char* what) {
  std::vector<float> out;
  if (obj.is_none()) return out;
  borrowed b = from_dlpack(obj, what);
  if (b.view.ndim != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  if (!dtype_is_float(b.view.type)) throw type_error(std::string(what) + " must be a float tensor");
  out.resize(static_cast<size_t>(b.view.shape[0]));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_f32(b.view.data, b.view.type, i * b.view.strides[0]);
  return out;
}

std::vector<std::vector<cache_segment>> parse_views(const py::handle& views) {
  std::vector<std::vector<cache_segment>> out;
  for (auto row : py::iter(views)) {
    std::vector<cache_segment> r;
    if (py::isinstance<py::int_>(row)) {
      r.push_back({py::cast<int64_t>(row), 0});
    } else {
      for (auto seg : py::iter(row)) {
        if (py::isinstance<py::int_>(seg)) {
          r.push_back({py::cast<int64_t>(seg), 0});
        } else {
          auto t = py::cast<py::tuple>(seg);
          if (t.size() != 2) throw std::invalid_argument("a view segment is seq or (seq, delta)");
          r.push_back({py::cast<int64_t>(t[0]), py::cast<int64_t>(t[1])});
        }
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvloom C++ core: block pool, paged per-head KV cache, policies, CPU decode attention";

  py::register_exception<capacity_error>(m, "CapacityError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  py::class_<block_pool, std::shared_ptr<block_pool>>(m, "BlockPool")
      .def(py::init([](const std::string& dt, int head_dim, int block_size, int64_t capacity_blocks, int64_t chunk_blocks) {
             return std::make_shared<block_pool>(parse_dtype(dt), head_dim, block_size, capacity_blocks, chunk_blocks);
           }),
           py::arg("dtype"), py::arg("head_dim"), py::arg("block_size") = 16, py::arg("capacity_blocks"),
           py::arg("chunk_blocks") = 0)
      .def_property_readonly("dtype", [](const block_pool& p) { return std::string(dtype_name(p.type())); })
      .def_property_readonly("head_dim", &block_pool::head_dim)
      .def_property_readonly("block_size", &block_pool::block_size)
      .def_property_readonly("block_bytes", &block_pool::block_bytes)
      .def_property_readonly("capacity_blocks", &block_pool::capacity_blocks)
      .def_property_readonly("used_blocks", &block_pool::used_blocks)
      .def_property_readonly("free_blocks", &block_pool::free_blocks)
      .def_property_readonly("reserved_bytes", &block_pool::reserved_bytes)
      .def("refcount", &block_pool::refcount, py::arg("block"));

  py::class_<policy, std::shared_ptr<policy>>(m, "Policy").def_property_readonly("name", &policy::name).def("__repr__", &policy::name);
  py::class_<full_policy, policy, std::shared_ptr<full_policy>>(m, "FullPolicy").def(py::init<>());
  py::class_<window_policy, policy, std::shared_ptr<window_policy>>(m, "WindowPolicy")
      .def(py::init<int64_t, int64_t>(), py::arg("sinks") = 4, py::arg("recent") = 1024)
      .def_property_readonly("sinks", &window_policy::sinks)
      .def_property_readonly("recent", &window_policy::recent);

  py::class_<nats_policy, policy, std::shared_ptr<nats_policy>>(m, "NatsPolicy")
      .def(py::init<int64_t>(), py::arg("window"))
      .def_property_readonly("window", &nats_policy::window);

  py::class_<heavy_hitter_policy, policy, std::shared_ptr<heavy_hitter_policy>>(m, "HeavyHitterPolicy")
      .def(py::init<double, int64_t>(), py::arg("ratio") = 0.1, py::arg("recent") = 64)
      .def_property_readonly("ratio", &heavy_hitter_policy::ratio)
      .def_property_readonly("recent", &heavy_hitter_policy::recent);

  py::class_<head_plan, std::shared_ptr<head_plan>>(m, "HeadPlan").def_property_readonly("name", &head_plan::name);
  py::class_<fastgen_plan, head_plan, std::shared_ptr<fastgen_plan>>(m, "FastGenPlan")
      .def(py::init<int, int64_t, double>(), py::arg("level"), py::arg("local_window"), py::arg("r_frequent"))
      .def_property_readonly("level", &fastgen_plan::level);
  py::class_<keep_set_plan, head_plan, std::shared_ptr<keep_set_plan>>(m, "KeepSetPlan")
      .def(py::init<std::string, int64_t, int64_t, std::vector<int32_t>, bool>(), py::arg("label"), py::arg("sinks"),
           py::arg("recent"), py::arg("ords"), py::arg("keep_all") = false);
  m.attr("CLASS_SPECIAL") = kClassSpecial;
  m.attr("CLASS_PUNCT") = kClassPunct;

  py::class_<cache, std::shared_ptr<cache>>(m, "Cache")
      .def(py::init([](std::shared_ptr<block_pool> pool, int n_layers, int n_kv_heads, std::shared_ptr<policy> pol) {
             return std::make_shared<cache>(std::move(pool), n_layers, n_kv_heads, std::move(pol));
           }),
           py::arg("pool"), py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("policy") = nullptr)
      .def_property_readonly("n_layers", &cache::n_layers)
      .def_property_readonly("n_kv_heads", &cache::n_kv_heads)
      .def_property_readonly("head_dim", &cache::head_dim)
      .def_property_readonly("block_size", &cache::block_size)
      .def_property_readonly("dtype", [](const cache& c) { return std::string(dtype_name(c.type())); })
      .def_property_readonly("policy", [](const cache& c) { return c.current_policy().name(); })
      .def("set_policy", [](cache& c, std::shared_ptr<policy> p) { c.set_policy(std::move(p)); })
      .def(
          "set_layer_policy", [](cache& c, int layer, std::shared_ptr<policy> p) { c.set_layer_policy(layer, std::move(p)); },
          py::arg("layer"), py::arg("policy").none(true))
      .def("seq_add", &cache::seq_add)
      .def("seq_fork", &cache::seq_fork, py::arg("seq"))
      .def("seq_drop", &cache::seq_drop, py::arg("seq"))
      .def("seq_rollback", &cache::seq_rollback, py::arg("seq"), py::arg("n_tokens"))
      .def("seq_exists", &cache::seq_exists, py::arg("seq"))
      .def("seq_ids", &cache::seq_ids)
      .def("seq_length", &cache::seq_length, py::arg("seq"))
      .def(
          "append",
          [](cache& c, int layer, int64_t seq, py::handle k, py::handle v, py::object positions, py::object classes) {
            borrowed bk = from_dlpack(k, "k"), bv = from_dlpack(v, "v");
            std::optional<borrowed> bp, bc;
            if (!positions.is_none()) bp = from_dlpack(positions, "positions");
            if (!classes.is_none()) bc = from_dlpack(classes, "classes");
            py::gil_scoped_release nogil;
            c.append(layer, seq, bk.view, bv.view, bp ? &bp->view : nullptr, bc ? &bc->view : nullptr);
          },
          py::arg("layer"), py::arg("seq"), py::arg("k"), py::arg("v"), py::arg("positions") = py::none(),
          py::arg("classes") = py::none())
      .def(
          "evict",
          [](cache& c, int layer, int head, int64_t seq, py::handle slots) {
            std::vector<int32_t> s = int_list(slots, "slots");
            c.evict(layer, head, seq, s.data(), static_cast<int64_t>(s.size()));
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"), py::arg("slots"))
      .def("apply_policy", &cache::apply_policy, py::arg("layer"), py::arg("seq"))
      .def("set_layer_sharing", &cache::set_layer_sharing, py::arg("store_of"))
      .def_property_readonly("layer_sharing", &cache::layer_sharing)
      .def("length", &cache::length, py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def(
          "lengths",
          [](const cache& c, int64_t seq) {
            std::vector<std::vector<int64_t>> out(static_cast<size_t>(c.n_layers()));
            for (int l = 0; l < c.n_layers(); ++l)
              for (int h = 0; h < c.n_kv_heads(); ++h) out[l].push_back(c.length(l, h, seq));
            return out;
          },
          py::arg("seq"), "live tokens per [layer][kv head]")
      .def(
          "plan_name", [](const cache& c, int layer, int head, int64_t seq) {
            const head_plan* p = c.store(layer, head, seq).plan();
            return p ? p->name() : std::string("none");
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def(
          "slots",
          [](const cache& c, int layer, int head, int64_t seq) {
            const head_store& hs = c.store(layer, head, seq);
            std::vector<int32_t> slot, ord, pos;
            for (int64_t s = 0; s < hs.n_slots(); ++s)
              if (hs.live(s)) {
                slot.push_back(static_cast<int32_t>(s));
                ord.push_back(hs.ord(s));
                pos.push_back(hs.pos(s));
              }
            return py::make_tuple(py::array_t<int32_t>(slot.size(), slot.data()), py::array_t<int32_t>(ord.size(), ord.data()),
                                  py::array_t<int32_t>(pos.size(), pos.data()));
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"), "(slot, ord, pos) arrays of the live slots, in slot order")
      .def(
          "block_table", [](const cache& c, int layer, int head, int64_t seq) { return c.store(layer, head, seq).table(); },
          py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def(
          "gather",
          [](const cache& c, int layer, int head, int64_t seq, py::handle k_out, py::handle v_out, py::object ord_out,
             py::object pos_out) {
            borrowed bk = from_dlpack(k_out, "k_out"), bv = from_dlpack(v_out, "v_out");
            std::optional<borrowed> bo, bp;
            if (!ord_out.is_none()) bo = from_dlpack(ord_out, "ord_out");
            if (!pos_out.is_none()) bp = from_dlpack(pos_out, "pos_out");
            py::gil_scoped_release nogil;
            c.gather(layer, head, seq, bk.view, bv.view, bo ? &bo->view : nullptr, bp ? &bp->view : nullptr);
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"), py::arg("k_out"), py::arg("v_out"),
          py::arg("ord_out") = py::none(), py::arg("pos_out") = py::none())
      .def(
          "accumulate_attention",
          [](cache& c, int layer, std::vector<int64_t> seqs, py::handle q, float scale) {
            borrowed bq = from_dlpack(q, "q");
            py::gil_scoped_release nogil;
            c.accumulate_attention(layer, seqs, bq.view, scale);
          },
          py::arg("layer"), py::arg("seqs"), py::arg("q"), py::arg("scale") = 0.f)
      .def(
          "scores",
          [](const cache& c, int layer, int head, int64_t seq) {
            const head_store& hs = c.store(layer, head, seq);
            std::vector<float> sc;
            for (int64_t s = 0; s < hs.n_slots(); ++s)
              if (hs.live(s)) sc.push_back(hs.score(s));
            return py::array_t<float>(sc.size(), sc.data());
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"), "accumulated attention of the live slots, in slot order")
      .def(
          "hybrid_recovery",
          [](const cache& c, int layer, std::vector<int64_t> seqs, py::handle q, float scale, double r_frequent,
             int64_t local_window) {
            borrowed bq = from_dlpack(q, "q");
            std::vector<double> out(seqs.size() * static_cast<size_t>(c.n_kv_heads()) * 4);
            {
              py::gil_scoped_release nogil;
              c.hybrid_recovery(layer, seqs, bq.view, scale, r_frequent, local_window, out.data());
            }
            return py::array_t<double>({static_cast<py::ssize_t>(seqs.size()), static_cast<py::ssize_t>(c.n_kv_heads()),
                                        static_cast<py::ssize_t>(4)}, out.data());
          },
          py::arg("layer"), py::arg("seqs"), py::arg("q"), py::arg("scale"), py::arg("r_frequent"), py::arg("local_window"))
      .def(
          "set_head_plan",
          [](cache& c, int layer, int head, int64_t seq, std::shared_ptr<head_plan> plan) { c.set_head_plan(layer, head, seq, plan); },
          py::arg("layer"), py::arg("head"), py::arg("seq"), py::arg("plan"))
      .def(
          "classes",
          [](const cache& c, int layer, int head, int64_t seq) {
            const head_store& hs = c.store(layer, head, seq);
            std::vector<uint8_t> cl;
            for (int64_t s = 0; s < hs.n_slots(); ++s)
              if (hs.live(s)) cl.push_back(hs.token_class(s));
            return py::array_t<uint8_t>(cl.size(), cl.data());
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def("memory_bytes", &cache::memory_bytes)
      .def("blocks_held", &cache::blocks_held)
      .def(
          "attend",
          [](const cache& c, int layer, py::handle q, py::handle out, py::handle views, float scale, py::object inv_freq) {
            borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
            auto vw = parse_views(views);
            std::vector<float> f = float_list(inv_freq, "inv_freq");
            rope_spec rope{f.empty() ? nullptr : f.data(), static_cast<int>(f.size())};
            py::gil_scoped_release nogil;
            decode_attention_cache(c, layer, vw, bq.view, bo.view, scale, rope);
          },
          py::arg("layer"), py::arg("q"), py::arg("out"), py::arg("views"), py::arg("scale") = 0.f,
          py::arg("inv_freq") = py::none());

  m.def(
      "decode_attention",
      [](py::handle q, py::list segments, py::handle out, float scale, py::object inv_freq) {
        borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
        std::vector<borrowed> keep;
        std::vector<std::vector<int64_t>> deltas;
        std::vector<dense_segment> segs;
        keep.reserve(2 * segments.size());
        deltas.reserve(segments.size());
        for (auto item : segments) {
          auto t = py::cast<py::tuple>(item);
          if (t.size() != 3) throw std::invalid_argument("each segment is (k, v, delta)");
          keep.push_back(from_dlpack(t[0], "k"));
          keep.push_back(from_dlpack(t[1], "v"));
          dense_segment s;
          s.k = keep[keep.size() - 2].view;
          s.v = keep.back().view;
          if (!t[2].is_none()) {
            std::vector<int64_t> d;
            for (auto x : py::iter(t[2])) d.push_back(py::cast<int64_t>(x));
            if (static_cast<int64_t>(d.size()) != (bq.view.ndim > 0 ? bq.view.shape[0] : 0))
              throw std::invalid_argument("segment delta needs one entry per batch row");
            deltas.push_back(std::move(d));
            s.delta = deltas.back().data();
          }
          segs.push_back(s);
        }
        std::vector<float> f = float_list(inv_freq, "inv_freq");
        rope_spec rope{f.empty() ? nullptr : f.data(), static_cast<int>(f.size())};
        py::gil_scoped_release nogil;
        decode_attention_dense(bq.view, segs, bo.view, scale, rope);
      },
      py::arg("q"), py::arg("segments"), py::arg("out"), py::arg("scale") = 0.f, py::arg("inv_freq") = py::none());

  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("kernel_isa", &kernel_isa);
  m.def("force_generic_kernels", &force_generic_kernels, py::arg("on"));
  m.def(
      "read_probe",
      [](py::handle buf) {
        borrowed b = from_dlpack(buf, "buffer");
        if (b.view.type != dtype::f32) throw type_error("read_probe takes a float32 buffer");
        int64_t expect = 1;
        for (int i = b.view.ndim - 1; i >= 0; --i) {
          if (b.view.shape[i] > 1 && b.view.strides[i] != expect) throw std::invalid_argument("read_probe needs a contiguous buffer");
          expect *= b.view.shape[i];
        }
        const size_t bytes = static_cast<size_t>(b.view.numel()) * 4;
        py::gil_scoped_release nogil;
        return read_probe(b.view.data, bytes);
      },
      py::arg("buffer"));
#ifdef KVLOOM_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("cuda_device_count", &kvloom::cuda::device_count);
#else
  m.attr("cuda_built") = false;
  m.def("cuda_device_count", []() { return 0; });
#endif
}
