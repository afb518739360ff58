// kvloom._core.Cache: structure and sequences, tokens, inspection.
#include <optional>

#include "bind.h"
#include "kvloom/cache.h"
#include "plans/plan_impl.h"

namespace kvloom {
namespace bind {

namespace {

using cache_class = py::class_<cache, std::shared_ptr<cache>>;

void bind_structure(cache_class& c) {
  c.def(py::init([](std::shared_ptr<block_pool> pool, int n_layers, int n_kv_heads, std::shared_ptr<head_plan> plan) {
         return std::make_shared<cache>(std::move(pool), n_layers, n_kv_heads, std::move(plan));
       }),
       py::arg("pool"), py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("plan") = nullptr)
      .def_property_readonly("n_layers", &cache::n_layers)
      .def_property_readonly("n_kv_heads", &cache::n_kv_heads)
      .def_property_readonly("head_dim", &cache::head_dim)
      .def_property_readonly("block_size", &cache::block_size)
      .def_property_readonly("dtype", [](const cache& c) { return std::string(dtype_name(c.type())); })
      .def_property_readonly("policy", [](const cache& c) { return plan_describe(c.default_plan()); })
      .def("set_plan", [](cache& c, std::shared_ptr<head_plan> p) { c.set_plan(std::move(p)); }, py::arg("plan"))
      .def(
          "set_layer_plan", [](cache& c, int layer, std::shared_ptr<head_plan> p) { c.set_layer_plan(layer, std::move(p)); },
          py::arg("layer"), py::arg("plan").none(true))
      .def(
          "set_head_plan",
          [](cache& c, int layer, int head, int64_t seq, std::shared_ptr<head_plan> p) { c.set_head_plan(layer, head, seq, p); },
          py::arg("layer"), py::arg("head"), py::arg("seq"), py::arg("plan"))
      .def("set_layer_sharing", &cache::set_layer_sharing, py::arg("store_of"))
      .def("set_quantized", &cache::set_quantized, py::arg("pool"))
      .def("set_budget", &cache::set_budget, py::arg("fraction"))
      .def_property_readonly("budget", &cache::budget)
      .def("budget_bytes", &cache::budget_bytes, py::arg("full_tokens"))
      .def_property_readonly("layer_sharing", &cache::layer_sharing)
      .def("seq_add", &cache::seq_add)
      // the GIL is released where an operation may wait for others (structural ones) or move
      // memory (rollback, policies), so other Python threads keep running meanwhile
      .def("seq_fork", &cache::seq_fork, py::arg("seq"), py::call_guard<py::gil_scoped_release>())
      .def("seq_drop", &cache::seq_drop, py::arg("seq"), py::call_guard<py::gil_scoped_release>())
      .def("seq_rollback", &cache::seq_rollback, py::arg("seq"), py::arg("n_tokens"),
           py::call_guard<py::gil_scoped_release>())
      .def("seq_exists", &cache::seq_exists, py::arg("seq"))
      .def("seq_ids", &cache::seq_ids)
      .def("seq_length", &cache::seq_length, py::arg("seq"))
      .def(
          "export_sequences",
          [](const cache& c, const std::vector<int64_t>& seqs) {
            std::vector<uint8_t> blob;
            {
              py::gil_scoped_release nogil;
              blob = c.export_sequences(seqs);
            }
            return py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
          },
          py::arg("seqs"))
      .def(
          "import_sequences",
          [](cache& c, py::buffer data, bool keep_ids) {
            py::buffer_info info = data.request();
            if (info.ndim != 1 || info.itemsize != 1) throw std::invalid_argument("snapshot data must be bytes");
            const auto* p = static_cast<const uint8_t*>(info.ptr);
            const size_t n = static_cast<size_t>(info.size);
            py::gil_scoped_release nogil;
            return c.import_sequences(p, n, keep_ids);
          },
          py::arg("data"), py::arg("keep_ids") = false);
}

void bind_tokens(cache_class& c) {
  c.def(
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
      .def("apply_policy", &cache::apply_policy, py::arg("layer"), py::arg("seq"), py::arg("full_tokens") = -1,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "accumulate_attention",
          [](cache& c, int layer, std::vector<int64_t> seqs, py::handle q, float scale) {
            borrowed bq = from_dlpack(q, "q");
            py::gil_scoped_release nogil;
            c.accumulate_attention(layer, seqs, bq.view, scale);
          },
          py::arg("layer"), py::arg("seqs"), py::arg("q"), py::arg("scale") = 0.f)
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
          py::arg("inv_freq") = py::none())
      .def(
          "attend_accumulate",
          [](cache& c, int layer, py::handle q, py::handle out, std::vector<int64_t> seqs, float scale) {
            borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
            py::gil_scoped_release nogil;
            decode_attention_accumulate(c, layer, seqs, bq.view, bo.view, scale);
          },
          py::arg("layer"), py::arg("q"), py::arg("out"), py::arg("seqs"), py::arg("scale") = 0.f)
      .def(
          "chunk_attend",
          [](const cache& c, int layer, py::handle q, py::handle out, std::vector<int64_t> seqs, py::object mask,
             float scale) {
            borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
            std::optional<borrowed> bm;
            if (!mask.is_none()) bm = from_dlpack(mask, "mask");
            py::gil_scoped_release nogil;
            chunk_attention_cache(c, layer, seqs, bq.view, bm ? &bm->view : nullptr, bo.view, scale);
          },
          py::arg("layer"), py::arg("q"), py::arg("out"), py::arg("seqs"), py::arg("mask") = py::none(),
          py::arg("scale") = 0.f);
}

// (slot, ord, pos, class, score) arrays of a head's live slots, in slot order.
py::tuple live_slot_arrays(const cache& c, int layer, int head, int64_t seq) {
  const std::vector<slot_info> s = c.live_slots(layer, head, seq);
  const py::ssize_t n = static_cast<py::ssize_t>(s.size());
  py::array_t<int32_t> slot(n), ord(n), pos(n);
  py::array_t<uint8_t> cls(n);
  py::array_t<float> score(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    slot.mutable_at(i) = s[i].slot;
    ord.mutable_at(i) = s[i].ord;
    pos.mutable_at(i) = s[i].pos;
    cls.mutable_at(i) = s[i].cls;
    score.mutable_at(i) = s[i].score;
  }
  return py::make_tuple(slot, ord, pos, cls, score);
}

void bind_inspect(cache_class& c) {
  c.def("length", &cache::length, py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def(
          "lengths",
          [](const cache& c, int64_t seq) {
            std::vector<std::vector<int64_t>> out(static_cast<size_t>(c.n_layers()));
            for (int l = 0; l < c.n_layers(); ++l)
              for (int h = 0; h < c.n_kv_heads(); ++h) out[l].push_back(c.length(l, h, seq));
            return out;
          },
          py::arg("seq"), "live tokens per [layer][kv head]")
      .def("plan_name", &cache::plan_name, py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def("live_slots", &live_slot_arrays, py::arg("layer"), py::arg("head"), py::arg("seq"),
           "(slot, ord, pos, class, score) arrays of the live slots, in slot order")
      .def(
          "give_way_keys",
          [](const cache& c, int layer, int head, int64_t seq) {
            const std::vector<give_way_key> k = c.give_way_keys(layer, head, seq);
            const py::ssize_t n = static_cast<py::ssize_t>(k.size());
            py::array_t<int32_t> tier(n);
            py::array_t<double> value(n);
            for (py::ssize_t i = 0; i < n; ++i) {
              tier.mutable_at(i) = k[i].tier;
              value.mutable_at(i) = k[i].value;
            }
            return py::make_tuple(tier, value);
          },
          py::arg("layer"), py::arg("head"), py::arg("seq"), "(tier, value) of each live slot's budget key, in slot order")
      .def(
          "budget_units",
          [](const cache& c, int layer, int64_t seq) {
            size_t projected = 0;
            const std::vector<cache::budget_unit> u = c.budget_units(layer, seq, &projected);
            const py::ssize_t n = static_cast<py::ssize_t>(u.size());
            py::array_t<int32_t> tier(n), ord(n), head(n);
            py::array_t<double> value(n);
            py::array_t<int64_t> index(n), frees(n);
            py::array_t<bool> block(n);
            for (py::ssize_t i = 0; i < n; ++i) {
              tier.mutable_at(i) = u[i].key.tier;
              value.mutable_at(i) = u[i].key.value;
              ord.mutable_at(i) = u[i].ord;
              head.mutable_at(i) = u[i].head;
              index.mutable_at(i) = u[i].index;
              block.mutable_at(i) = u[i].block;
              frees.mutable_at(i) = static_cast<int64_t>(u[i].frees);
            }
            py::dict out;
            for (auto [k, v] : {std::pair<const char*, py::object>{"tier", tier}, {"value", value}, {"ord", ord},
                                {"head", head}, {"index", index}, {"block", block}, {"frees", frees}})
              out[k] = v;
            return py::make_tuple(out, projected);
          },
          py::arg("layer"), py::arg("seq"),
          "({tier, value, ord, head, index, block, frees} arrays in give-way order, projected bytes)")
      .def(
          "give_way",
          [](cache& c, int layer, int64_t seq, const std::vector<int>& heads, const std::vector<int64_t>& indices,
             const std::vector<bool>& blocks) {
            if (heads.size() != indices.size() || heads.size() != blocks.size())
              throw std::invalid_argument("give_way: heads, indices and blocks must have one entry per unit");
            std::vector<cache::budget_unit> units(heads.size());
            for (size_t i = 0; i < units.size(); ++i) {
              units[i].head = heads[i];
              units[i].index = indices[i];
              units[i].block = blocks[i];
            }
            py::gil_scoped_release nogil;
            return c.give_way(layer, seq, units);
          },
          py::arg("layer"), py::arg("seq"), py::arg("heads"), py::arg("indices"), py::arg("blocks"))
      .def("layer_bytes", &cache::layer_bytes, py::arg("layer"), py::arg("seq"))
      .def("block_table", &cache::block_table, py::arg("layer"), py::arg("head"), py::arg("seq"))
      .def("sealed_entries", &cache::sealed_entries, py::arg("layer"), py::arg("head"), py::arg("seq"))
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
      .def("memory_bytes", &cache::memory_bytes, py::call_guard<py::gil_scoped_release>())
      .def("blocks_held", &cache::blocks_held, py::call_guard<py::gil_scoped_release>());
}

}  // namespace

std::vector<std::vector<cache_segment>> parse_views(const py::handle& views) {
  std::vector<std::vector<cache_segment>> out;
  for (auto row : py::iter(views)) {
    std::vector<cache_segment> r;
    if (py::isinstance<py::int_>(row)) {
      r.push_back({py::cast<int64_t>(row), 0});
      out.push_back(std::move(r));
      continue;
    }
    for (auto seg : py::iter(row)) {
      if (py::isinstance<py::int_>(seg)) {
        r.push_back({py::cast<int64_t>(seg), 0});
        continue;
      }
      auto t = py::cast<py::tuple>(seg);
      if (t.size() != 2) throw std::invalid_argument("a view segment is seq or (seq, delta)");
      r.push_back({py::cast<int64_t>(t[0]), py::cast<int64_t>(t[1])});
    }
    out.push_back(std::move(r));
  }
  return out;
}

void bind_cache(py::module_& m) {
  cache_class c(m, "Cache");
  bind_structure(c);
  bind_tokens(c);
  bind_inspect(c);
}

}  // namespace bind
}  // namespace kvloom
