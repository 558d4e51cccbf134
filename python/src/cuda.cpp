// The CUDA path on CUDA tensors, two ways:
//  - nsa.forward / nsa.backward (every output and gradient, as the command's files): through the
//    host API of cuda/nsa_cuda.hpp (cuda::forward, cuda::backward); the Python layer brings the
//    tensors to host float32, the device rounds them to the operand precision, and the float32
//    results go back to the tensors' device, as `nsa forward --device cuda` does with files.
//  - nsa.torch.attention's forward (o only): zero-copy on the caller's stream. A Plan per shape
//    and setting is kept (its buffers are allocated once), bound to the tensors' memory
//    (Plan::bind_device) and run on the stream PyTorch has current, so the call adds no copy
//    and no synchronisation and can be captured in a CUDA graph.
// Only Options' dtype, device and deterministic fields are set; the kernel choice is the default.
#include <map>
#include <memory>

#include "common.hpp"
#include "nsa_cuda.hpp"

namespace nsa::py {

namespace {

Config cuda_config(const nb::dict& settings, const nb::dict& arrays) {
  auto dims = [&](const char* n) {
    const auto a = nb::cast<AnyArray>(arrays[n]);
    if (a.ndim() != 3) throw InputError(cat(n, ": rank ", a.ndim(), ", expected [N, H, D]"));
    return std::array<int64_t, 3>{int64_t(a.shape(0)), int64_t(a.shape(1)), int64_t(a.shape(2))};
  };
  const auto q = dims("q"), k = dims("k"), v = dims("v");
  if (k[1] < 1 || q[1] % k[1] != 0)
    throw InputError(cat("head counts: q has Hq = ", q[1], " query heads, k has Hkv = ", k[1],
                         " key/value heads; expected Hq a multiple of Hkv (G = Hq / Hkv query heads per group)"));
  return make_config(settings, q[1], k[1], q[2], v[2]);
}

cuda::Options options(const std::string& dtype, int device, bool deterministic) {
  cuda::Options opt;
  opt.dtype = cuda::parse_precision(dtype);
  opt.device = device;
  opt.deterministic = deterministic;
  std::string why;
  if (!cuda::available(&why)) throw CudaError(cat("device = cuda: ", why));
  return opt;
}

// Plans by (settings, packing, dtype, device): made once (cudaMalloc synchronises, so not while
// a graph is being captured), reused by every call of that shape. A few at most are kept.
std::map<std::string, std::unique_ptr<cuda::Plan>>& plans() {
  static std::map<std::string, std::unique_ptr<cuda::Plan>> p;
  return p;
}

const char* cuda_dtype_name(const AnyArray& a) {
  const auto d = a.dtype();
  if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return "bf16";
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 16) return "fp16";
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32) return "fp32";
  return "other";
}

// A C-contiguous CUDA tensor on `device` of `dtype` ("bf16", "fp16", "fp32") and `shape`.
const void* device_ptr(const AnyArray& a, const std::string& name, int device, const std::string& dtype,
                       const std::vector<int64_t>& shape) {
  if (a.device_type() != nb::device::cuda::value || a.device_id() != device)
    throw InputError(cat(name, ": not on cuda:", device, " (q's device)"));
  if (cuda_dtype_name(a) != dtype) throw InputError(cat(name, ": dtype ", cuda_dtype_name(a), ", expected ", dtype));
  if (a.ndim() != shape.size()) throw InputError(cat(name, ": rank ", a.ndim(), ", expected ", shape_str(shape)));
  int64_t expect = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (int64_t(a.shape(i)) != shape[i])
      throw InputError(cat(name, ": shape differs from the expected ", shape_str(shape)));
    if (shape[i] > 1 && a.stride(i) != expect) throw InputError(cat(name, ": not C-contiguous"));
    expect *= shape[i];
  }
  return a.data();
}

}  // namespace

void bind_cuda(nb::module_& m) {
  m.def("cuda_available", [] { return cuda::available(); });
  m.def("cuda_device_name", [] { return cuda::device_name(); });
  m.def(
      "cuda_forward",
      [](const nb::dict& settings, const nb::dict& arrays, const std::vector<int64_t>& cu, uint64_t seed,
         const std::string& gate_act, const std::string& dtype, int device) {
        const Config cfg = cuda_config(settings, arrays);
        const auto in = make_inputs<float>(cfg, arrays, cu, gate_act, seed, false);
        const cuda::Options opt = options(dtype, device, false);
        ref::ForwardResult<float> r;
        {
          nb::gil_scoped_release release;
          r = cuda::forward(cfg, in, opt);
        }
        return forward_dict(std::move(r));
      },
      nb::arg("settings"), nb::arg("arrays"), nb::arg("cu_seqlens"), nb::arg("seed"), nb::arg("gate_act"),
      nb::arg("dtype"), nb::arg("device"));
  m.def(
      "cuda_backward",
      [](const nb::dict& settings, const nb::dict& arrays, const AnyArray& dO_arr, const std::vector<int64_t>& cu,
         uint64_t seed, const std::string& gate_act, const std::string& dtype, int device, bool deterministic) {
        const Config cfg = cuda_config(settings, arrays);
        const auto in = make_inputs<float>(cfg, arrays, cu, gate_act, seed, false);
        const Tensor<float> dO = to_tensor<float>(dO_arr, "do");
        ref::check_output_grad(cfg, in, dO, false, [](const std::string& r) { return r; });
        cuda::Options opt = options(dtype, device, deterministic);
        ref::BackwardResult<float> g;
        {
          nb::gil_scoped_release release;
          g = cuda::backward(cfg, in, dO, opt);
        }
        return backward_dict(std::move(g));
      },
      nb::arg("settings"), nb::arg("arrays"), nb::arg("do"), nb::arg("cu_seqlens"), nb::arg("seed"),
      nb::arg("gate_act"), nb::arg("dtype"), nb::arg("device"), nb::arg("deterministic"));
  m.def(
      "cuda_attention",
      [](const nb::dict& settings, const AnyArray& q, const AnyArray& k, const AnyArray& v, const AnyArray& gates,
         const AnyArray& o, const std::vector<AnyArray>& phi, const std::vector<int64_t>& cu, uintptr_t stream) {
        // q [N, Hq, dk], k [N, Hkv, dk], v [N, Hkv, dv], gates [N, Hq, 3] fp32, o [N, Hq, dv]; phi in the order
        // of the --compress-params files (pe, w1, b1, w2, b2 or pe, w, b; keys then values).
        if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
          throw InputError("q, k, v: expected packed [N, H, D] tensors");
        const int64_t N = int64_t(q.shape(0)), Hq = int64_t(q.shape(1)), dk = int64_t(q.shape(2));
        const int64_t Hkv = int64_t(k.shape(1)), dv = int64_t(v.shape(2));
        if (Hkv < 1 || Hq % Hkv != 0)
          throw InputError(cat("head counts: q has Hq = ", Hq, " query heads, k has Hkv = ", Hkv,
                               " key/value heads; expected Hq a multiple of Hkv (G = Hq / Hkv query heads per group)"));
        const Config cfg = make_config(settings, Hq, Hkv, dk, dv);
        const int device = q.device_id();
        const std::string dtype = cuda_dtype_name(q);
        cuda::Plan::DeviceIO io;
        io.q = device_ptr(q, "q", device, dtype, {N, Hq, dk});
        io.k = device_ptr(k, "k", device, dtype, {N, Hkv, dk});
        io.v = device_ptr(v, "v", device, dtype, {N, Hkv, dv});
        io.gates = static_cast<const float*>(device_ptr(gates, "gates", device, "fp32", {N, Hq, 3}));
        io.o = const_cast<void*>(device_ptr(o, "o", device, dtype, {N, Hq, dv}));
        const std::vector<int64_t> seq = cu.empty() ? std::vector<int64_t>{0, N} : cu;
        if (seq.size() < 2 || seq.front() != 0 || seq.back() != N)
          throw InputError(cat("cu_seqlens: must start at 0 and end at N = ", N));
        if (cfg.compress != CompressKind::Mean) {
          const bool linear = cfg.compress == CompressKind::Linear;
          const size_t per = linear ? 3 : 5;
          if (phi.size() != 2 * per)
            throw InputError(cat("compress_params: ", phi.size(), " tensors, compress = ", to_string(cfg.compress),
                                 " takes ", 2 * per));
          for (int kv = 0; kv < 2; ++kv) {
            const int64_t D = kv ? dv : dk, hc = kv ? cfg.hidden_v() : cfg.hidden_k(), l = cfg.cmp_len;
            const std::string s = kv ? "_v" : "_k";
            const AnyArray* t = &phi[kv * per];
            cuda::Plan::DevicePhi& d = kv ? io.phi_v : io.phi_k;
            d.pe = static_cast<const float*>(device_ptr(t[0], "pe" + s, device, "fp32", {Hkv, l, D}));
            if (linear) {
              d.w = device_ptr(t[1], "w" + s, device, dtype, {Hkv, D, l * D});
              d.b = static_cast<const float*>(device_ptr(t[2], "b" + s, device, "fp32", {Hkv, D}));
            } else {
              d.w1 = device_ptr(t[1], "w1" + s, device, dtype, {Hkv, hc, l * D});
              d.b1 = static_cast<const float*>(device_ptr(t[2], "b1" + s, device, "fp32", {Hkv, hc}));
              d.w2 = device_ptr(t[3], "w2" + s, device, dtype, {Hkv, D, hc});
              d.b2 = static_cast<const float*>(device_ptr(t[4], "b2" + s, device, "fp32", {Hkv, D}));
            }
          }
        }
        std::string key = cat(dtype, " dev", device, " N", N, " Hq", Hq, " Hkv", Hkv, " dk", dk, " dv", dv, " l",
                              cfg.cmp_len, " d", cfg.cmp_stride, " l'", cfg.slc_len, " n", cfg.slc_count, " w",
                              cfg.window, " ib", cfg.init_blocks, " lb", cfg.local_blocks, " c",
                              to_string(cfg.compress), " h", cfg.cmp_hidden, " a", to_string(cfg.cmp_act), " s",
                              cfg.scale, " cu");
        for (int64_t c : seq) key += cat(",", c);
        auto& cache = plans();
        auto it = cache.find(key);
        if (it == cache.end()) {
          if (cache.size() >= 8) cache.clear();
          cuda::Options opt = options(dtype, device, false);
          opt.intermediates = false;  // o alone is returned: no o_win, no block_scores
          it = cache.emplace(key, std::make_unique<cuda::Plan>(cfg, N, seq, opt)).first;
        }
        it->second->bind_device(io);
        it->second->run(reinterpret_cast<CUstream_st*>(stream));
      },
      nb::arg("settings"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("gates"), nb::arg("o"), nb::arg("phi"),
      nb::arg("cu_seqlens"), nb::arg("stream"));
  m.def("cuda_release_plans", [] { plans().clear(); });

  // The CUDA twin of the reference's cache (cuda::Decoder): host inputs in, float32 outputs out.
  struct CudaCache {
    std::unique_ptr<cuda::Decoder> dec;
    Config cfg;
    ref::CompressParams<float> phi;
    std::string gate_act;
  };
  nb::class_<CudaCache>(m, "CudaDecodeCache")
      .def("__init__",
           [](CudaCache* self, const nb::dict& settings, const nb::dict& arrays, int64_t B, int64_t capacity,
              uint64_t seed, const std::string& gate_act, const std::string& dtype, int device) {
             const Config cfg = cuda_config(settings, arrays);
             if (B < 1) throw ConfigError(cat("batch = ", B, " is invalid: expected >= 1"));
             if (capacity < 1) throw ConfigError(cat("capacity = ", capacity, " is invalid: expected >= 1"));
             const auto in = make_inputs<float>(cfg, arrays, {}, gate_act, seed, false);
             const cuda::Options opt = options(dtype, device, false);
             auto dec = std::make_unique<cuda::Decoder>(cfg, ref::kv_sharing(in), B, capacity, opt);
             if (cfg.compress != CompressKind::Mean) dec->set_phi(in.phi);
             new (self) CudaCache{std::move(dec), cfg, in.phi, gate_act};
           })
      .def_prop_ro("lengths", [](const CudaCache& c) { return c.dec->lengths(); })
      .def("prefill",
           [](CudaCache& c, const nb::dict& arrays, const std::vector<int64_t>& cu, const std::vector<int64_t>& seqs) {
             auto in = make_inputs<float>(c.cfg, arrays, cu, c.gate_act, 0, false);
             in.phi = c.phi;
             ref::ForwardResult<float> r;
             {
               nb::gil_scoped_release release;
               r = c.dec->prefill(in, seqs);
             }
             return forward_dict(std::move(r));
           })
      .def("step", [](CudaCache& c, const nb::dict& arrays, const std::vector<int64_t>& seqs) {
        auto in = make_inputs<float>(c.cfg, arrays, {}, c.gate_act, 0, false);
        in.phi = c.phi;
        ref::StepResult<float> r;
        {
          nb::gil_scoped_release release;
          r = c.dec->step(in, seqs);
        }
        return step_dict(std::move(r));
      });
  m.def("cuda_unavailable_reason", [] {
    std::string why;
    return cuda::available(&why) ? std::string() : why;
  });
}

}  // namespace nsa::py
