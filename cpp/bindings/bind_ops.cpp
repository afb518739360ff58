// Dense decode attention, threads, kernel path, the bandwidth probe and the CUDA build flag.
#include "bind.h"
#include "diagnostics.h"
#include "kvloom/device.h"

namespace kvloom {
namespace bind {

namespace {

// segments: [(k, v, delta or None), ...]; `keep` holds the borrowed tensors alive.
std::vector<dense_segment> parse_dense_segments(const py::list& segments, int64_t batch, std::vector<borrowed>& keep,
                                                std::vector<std::vector<int64_t>>& deltas) {
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
      if (static_cast<int64_t>(d.size()) != batch) throw std::invalid_argument("segment delta needs one entry per batch row");
      deltas.push_back(std::move(d));
      s.delta = deltas.back().data();
    }
    segs.push_back(s);
  }
  return segs;
}

double probe(py::handle buf) {
  borrowed b = from_dlpack(buf, "buffer");
  if (b.view.type != dtype::f32) throw type_error("read_probe takes a float32 buffer");
  check_cpu(b.view, "read_probe buffer");
  int64_t expect = 1;
  for (int i = b.view.ndim - 1; i >= 0; --i) {
    if (b.view.shape[i] > 1 && b.view.strides[i] != expect) throw std::invalid_argument("read_probe needs a contiguous buffer");
    expect *= b.view.shape[i];
  }
  const size_t bytes = static_cast<size_t>(b.view.numel()) * 4;
  py::gil_scoped_release nogil;
  return read_probe(b.view.data, bytes);
}

// Dense quantized KV: k, v fp32 [B, Hkv, T, D] (contiguous) <-> blocks uint8 [B, Hkv, n_blocks, bytes].
void check_blocks(const tensor_view& b, const quant_layout& L, int64_t B, int64_t H, int64_t T) {
  check_dtype(b, dtype::u8, "blocks");
  check_cpu(b, "blocks");
  const int64_t nb = (T + L.block_size - 1) / L.block_size;
  if (b.ndim != 4 || b.shape[0] != B || b.shape[1] != H || b.shape[2] < nb || b.shape[3] != static_cast<int64_t>(L.bytes) ||
      b.strides[3] != 1)
    throw std::invalid_argument("blocks must be uint8 [" + std::to_string(B) + ", " + std::to_string(H) + ", >= " +
                                std::to_string(nb) + ", " + std::to_string(L.bytes) + "] with contiguous blocks, got " + b.describe());
}

void check_rows(const tensor_view& t, const char* what, int64_t D) {
  check_dtype(t, dtype::f32, what);
  check_cpu(t, what);
  if (t.ndim != 4 || t.shape[3] != D || t.strides[3] != 1 || t.strides[2] != D)
    throw std::invalid_argument(std::string(what) + " must be float32 [B, Hkv, T, " + std::to_string(D) +
                                "] with contiguous rows, got " + t.describe());
}

template <class Fn>
void for_each_block(const tensor_view& k, const tensor_view& b, const quant_layout& L, Fn fn) {
  const int64_t T = k.shape[2];
  for (int64_t i = 0; i < k.shape[0]; ++i)
    for (int64_t h = 0; h < k.shape[1]; ++h)
      for (int64_t t0 = 0; t0 < T; t0 += L.block_size) {
        const int n = static_cast<int>(std::min<int64_t>(L.block_size, T - t0));
        fn(i * k.strides[0] + h * k.strides[1] + t0 * k.strides[2],
           static_cast<uint8_t*>(b.data) + i * b.strides[0] + h * b.strides[1] + (t0 / L.block_size) * b.strides[2], n);
      }
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def("quant_block_bytes", [](int bits, int block_size, int head_dim) {
    return make_quant_layout(bits, block_size, head_dim).bytes;
  }, py::arg("bits"), py::arg("block_size"), py::arg("head_dim"));
  m.def(
      "quantize_blocks",
      [](py::handle k, py::handle v, py::handle blocks, int bits, int block_size) {
        borrowed bk = from_dlpack(k, "k"), bv = from_dlpack(v, "v"), bb = from_dlpack(blocks, "blocks");
        check_rows(bk.view, "k", bk.view.ndim == 4 ? bk.view.shape[3] : 0);
        const quant_layout L = make_quant_layout(bits, block_size, static_cast<int>(bk.view.shape[3]));
        check_rows(bv.view, "v", L.head_dim);
        for (int i = 0; i < 4; ++i)
          if (bv.view.shape[i] != bk.view.shape[i] || bv.view.strides[i] != bk.view.strides[i])
            throw std::invalid_argument("v must have the shape and layout of k");
        check_blocks(bb.view, L, bk.view.shape[0], bk.view.shape[1], bk.view.shape[2]);
        const auto* kd = static_cast<const float*>(bk.view.data);
        const auto* vd = static_cast<const float*>(bv.view.data);
        py::gil_scoped_release nogil;
        for_each_block(bk.view, bb.view, L, [&](int64_t off, uint8_t* dst, int n) { quantize_block(L, kd + off, vd + off, n, nullptr, dst); });
      },
      py::arg("k"), py::arg("v"), py::arg("blocks"), py::arg("bits"), py::arg("block_size"));
  m.def(
      "dequantize_blocks",
      [](py::handle blocks, py::handle k_out, py::handle v_out, int bits, int block_size) {
        borrowed bb = from_dlpack(blocks, "blocks"), bk = from_dlpack(k_out, "k_out"), bv = from_dlpack(v_out, "v_out");
        check_rows(bk.view, "k_out", bk.view.ndim == 4 ? bk.view.shape[3] : 0);
        const quant_layout L = make_quant_layout(bits, block_size, static_cast<int>(bk.view.shape[3]));
        check_rows(bv.view, "v_out", L.head_dim);
        check_blocks(bb.view, L, bk.view.shape[0], bk.view.shape[1], bk.view.shape[2]);
        auto* kd = static_cast<float*>(bk.view.data);
        auto* vd = static_cast<float*>(bv.view.data);
        py::gil_scoped_release nogil;
        for_each_block(bk.view, bb.view, L, [&](int64_t off, uint8_t* src, int n) { dequantize_block(L, src, n, kd + off, vd + off); });
      },
      py::arg("blocks"), py::arg("k_out"), py::arg("v_out"), py::arg("bits"), py::arg("block_size"));
  m.def(
      "decode_attention_quantized",
      [](py::handle q, py::handle blocks, int64_t T, int bits, int block_size, py::handle out, float scale) {
        borrowed bq = from_dlpack(q, "q"), bb = from_dlpack(blocks, "blocks"), bo = from_dlpack(out, "out");
        if (bq.view.ndim != 3) throw std::invalid_argument("q must be [batch, q_heads, head_dim], got " + bq.view.describe());
        const quant_layout L = make_quant_layout(bits, block_size, static_cast<int>(bq.view.shape[2]));
        py::gil_scoped_release nogil;
        decode_attention_quantized(bq.view, bb.view, T, L, bo.view, scale);
      },
      py::arg("q"), py::arg("blocks"), py::arg("T"), py::arg("bits"), py::arg("block_size"), py::arg("out"),
      py::arg("scale") = 0.f);
  m.def(
      "decode_attention",
      [](py::handle q, py::list segments, py::handle out, float scale, py::object inv_freq) {
        borrowed bq = from_dlpack(q, "q"), bo = from_dlpack(out, "out");
        std::vector<borrowed> keep;
        std::vector<std::vector<int64_t>> deltas;
        std::vector<dense_segment> segs =
            parse_dense_segments(segments, bq.view.ndim > 0 ? bq.view.shape[0] : 0, keep, deltas);
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
  m.def("force_isa", &force_isa, py::arg("isa"), "cap the kernel path: 'auto', 'avx2' or 'generic'");
  m.def("read_probe", &probe, py::arg("buffer"));
  m.def("host_huge_pages", &host_huge_pages, "whether host block arenas ask for transparent huge pages, and why");
  m.def(
      "all_finite",
      [](py::handle t) {
        borrowed b = from_dlpack(t, "tensor");
        py::gil_scoped_release nogil;
        return all_finite(b.view);
      },
      py::arg("tensor"), "no NaN or infinity in a float CPU tensor (one pass, nothing allocated)");
  m.attr("cuda_built") = cuda_built();
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_architectures", &cuda_architectures, "the CUDA architectures compiled in, e.g. '80,90'");
  m.def(
      "set_current_stream", [](intptr_t handle) { set_current_stream(reinterpret_cast<void*>(handle)); },
      py::arg("handle"), "the calling thread's CUDA stream for kvloom's work (a cudaStream_t as an int; 0: default)");
}

}  // namespace bind
}  // namespace kvloom
