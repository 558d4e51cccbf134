// nsa._nsa: the reference (and, where built, the CUDA path: cuda.cpp) for Python. The functions
// here take packed arrays ([N, H, D], cu_seqlens) and settings named as the `nsa` command's
// options; python/nsa/ adds the keyword API, batches [B, T, H, D], PyTorch tensors and devices.
// Errors are the library's, with the argument's name where the command names its file:
// ConfigError and InputError raise ValueError, ResourceError MemoryError, CudaError RuntimeError.
#include <nanobind/stl/array.h>
#include <nanobind/stl/pair.h>

#include "common.hpp"
#include "decode.hpp"

namespace nsa::py {

namespace {

template <class T>
T get(const nb::dict& d, const char* key, T fallback) {
  return d.contains(key) ? nb::cast<T>(d[key]) : fallback;
}

std::string role_name(const std::string& role) { return role; }

}  // namespace

Config make_config(const nb::dict& s, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
  Config c;
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.cmp_len = get<int64_t>(s, "cmp_len", c.cmp_len);
  c.cmp_stride = get<int64_t>(s, "cmp_stride", c.cmp_stride);
  c.slc_len = get<int64_t>(s, "slc_len", c.slc_len);
  c.slc_count = get<int64_t>(s, "slc_count", c.slc_count);
  c.window = get<int64_t>(s, "window", c.window);
  c.init_blocks = get<int64_t>(s, "init_blocks", c.init_blocks);
  c.local_blocks = get<int64_t>(s, "local_blocks", c.local_blocks);
  c.compress = parse_compress_kind(get<std::string>(s, "compress", "mlp"));
  c.cmp_hidden = get<int64_t>(s, "cmp_hidden", 0);
  try {
    c.cmp_act = parse_activation(get<std::string>(s, "cmp_act", "gelu"));
  } catch (const ConfigError& e) {
    throw ConfigError(cat("cmp_act: ", e.what()));
  }
  c.scale = get<double>(s, "scale", 0.0);
  c.validate();
  return c;
}

template <class S>
std::vector<std::pair<std::string, Tensor<S>*>> phi_fields(ref::CompressParams<S>& phi, CompressKind kind) {
  std::vector<std::pair<std::string, Tensor<S>*>> out;
  if (kind == CompressKind::Mean) return out;
  for (auto [p, s] : {std::pair{&phi.k, "_k"}, std::pair{&phi.v, "_v"}}) {
    out.emplace_back(cat("pe", s), &p->pe);
    if (kind == CompressKind::Linear)
      out.insert(out.end(), {{cat("w", s), &p->w}, {cat("b", s), &p->b}});
    else
      out.insert(out.end(), {{cat("w1", s), &p->w1}, {cat("b1", s), &p->b1}, {cat("w2", s), &p->w2}, {cat("b2", s), &p->b2}});
  }
  return out;
}

template <class S>
ref::Inputs<S> make_inputs(const Config& cfg, const nb::dict& arrays, const std::vector<int64_t>& cu_seqlens,
                           const std::string& gate_act, uint64_t seed, bool allow_nonfinite) {
  ref::Inputs<S> in;
  auto take = [&](const std::string& name) -> Tensor<S> {
    if (!arrays.contains(name.c_str()) || arrays[name.c_str()].is_none()) return {};
    return to_tensor<S>(nb::cast<AnyArray>(arrays[name.c_str()]), name);
  };
  in.q = take("q"), in.k = take("k"), in.v = take("v");
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    in.k_own[c] = take("k_" + b);
    in.v_own[c] = take("v_" + b);
  }
  in.gates = take("gates");
  in.gate_mlp.x = take("gate_x"), in.gate_mlp.w = take("gate_w"), in.gate_mlp.b = take("gate_b");
  in.gate_mlp.w0 = take("gate_w0"), in.gate_mlp.b0 = take("gate_b0");
  const bool mlp = !in.gate_mlp.x.empty() || !in.gate_mlp.w.empty() || !in.gate_mlp.b.empty() ||
                   !in.gate_mlp.w0.empty() || !in.gate_mlp.b0.empty();
  if (mlp) {
    if (!in.gates.empty()) throw InputError("give either gates or the gate MLP (gate_x/gate_w/gate_b), not both");
    for (const auto& [n, t] : {std::pair{"gate_x", &in.gate_mlp.x}, {"gate_w", &in.gate_mlp.w}, {"gate_b", &in.gate_mlp.b}})
      if (t->empty()) throw InputError(cat("the gate MLP needs gate_x, gate_w and gate_b; ", n, " is missing"));
    if (in.gate_mlp.w0.empty() != in.gate_mlp.b0.empty())
      throw InputError("the gate MLP's hidden layer needs both gate_w0 and gate_b0");
    try {
      in.gate_mlp.act = parse_activation(gate_act);
    } catch (const ConfigError& e) {
      throw ConfigError(cat("gate_act: ", e.what()));
    }
  }
  auto fields = phi_fields(in.phi, cfg.compress);
  int given = 0;
  for (auto& [name, t] : fields) given += (*t = take(name)).empty() ? 0 : 1;
  if (cfg.compress == CompressKind::Mean) {
    for (const char* n : {"pe_k", "w_k", "w1_k", "pe_v", "w_v", "w1_v"})
      if (arrays.contains(n) && !arrays[n].is_none())
        throw InputError("compress = mean has no parameters; compress_params is not used");
  } else if (given == 0) {
    // Drawn in double and rounded to S, as `nsa forward --precision float` does.
    auto drawn = ref::random_compress_params<double>(cfg, seed);
    in.phi = drawn.template cast<S>();
  } else if (given != int(fields.size())) {
    for (auto& [name, t] : fields)
      if (t->empty())
        throw InputError(cat("compress_params: '", name, "' is missing (compress = ", to_string(cfg.compress),
                             " needs all of its parameters, or none to draw them from seed)"));
  }
  in.cu_seqlens = cu_seqlens;
  ref::check_inputs(cfg, in, allow_nonfinite, role_name);
  return in;
}

template <class S>
nb::dict forward_dict(ref::ForwardResult<S>&& r) {
  nb::dict d;
  d["o"] = to_numpy(std::move(r.o));
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    d[("o_" + b).c_str()] = to_numpy(std::move(r.o_branch[c]));
    d[("lse_" + b).c_str()] = to_numpy(std::move(r.lse[c]));
  }
  d["gates"] = to_numpy(std::move(r.gates));
  d["block_idx"] = to_numpy(std::move(r.block_idx));
  d["block_scores"] = to_numpy(std::move(r.block_scores));
  d["k_cmp_compressed"] = to_numpy(std::move(r.k_cmp_compressed));
  d["v_cmp_compressed"] = to_numpy(std::move(r.v_cmp_compressed));
  d["cu_seqlens_cmp"] = to_numpy(Tensor<int64_t>({int64_t(r.cu_cmp.size())}, r.cu_cmp));
  return d;
}

template <class S>
nb::dict backward_dict(ref::BackwardResult<S>&& g) {
  // The order and names of `nsa backward`'s files (experiments/cmd_backward.cpp).
  nb::dict d;
  d["dq"] = to_numpy(std::move(g.dq));
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    d[("dk_" + b).c_str()] = to_numpy(std::move(g.dk_branch[c]));
    d[("dv_" + b).c_str()] = to_numpy(std::move(g.dv_branch[c]));
  }
  if (!g.dk.empty()) d["dk"] = to_numpy(std::move(g.dk));
  if (!g.dv.empty()) d["dv"] = to_numpy(std::move(g.dv));
  d["dgates"] = to_numpy(std::move(g.dgates));
  for (int kv = 0; kv < 2; ++kv) {
    ref::PhiParams<S>& p = kv ? g.dphi.v : g.dphi.k;
    const std::string s = kv ? "_v" : "_k";
    for (const auto& [name, t] : {std::pair{"pe", &p.pe}, {"w", &p.w}, {"b", &p.b}, {"w1", &p.w1}, {"b1", &p.b1},
                                  {"w2", &p.w2}, {"b2", &p.b2}})
      if (!t->empty()) d[cat("d", name, s).c_str()] = to_numpy(std::move(*t));
  }
  auto& m = g.dgate_mlp;
  if (!m.x.empty()) {
    d["dgate_x"] = to_numpy(std::move(m.x));
    d["dgate_w"] = to_numpy(std::move(m.w));
    d["dgate_b"] = to_numpy(std::move(m.b));
    if (!m.w0.empty()) {
      d["dgate_w0"] = to_numpy(std::move(m.w0));
      d["dgate_b0"] = to_numpy(std::move(m.b0));
    }
  }
  return d;
}

template <class S>
nb::dict step_dict(ref::StepResult<S>&& r) {
  nb::dict d;
  d["o"] = to_numpy(std::move(r.o));
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    d[("o_" + b).c_str()] = to_numpy(std::move(r.o_branch[c]));
    d[("lse_" + b).c_str()] = to_numpy(std::move(r.lse[c]));
  }
  d["gates"] = to_numpy(std::move(r.gates));
  d["block_idx"] = to_numpy(std::move(r.block_idx));
  d["block_scores"] = to_numpy(std::move(r.block_scores));
  d["pos"] = to_numpy(Tensor<int64_t>({int64_t(r.pos.size())}, r.pos));
  return d;
}

template nb::dict step_dict(ref::StepResult<float>&&);
template std::vector<std::pair<std::string, Tensor<float>*>> phi_fields(ref::CompressParams<float>&, CompressKind);
template ref::Inputs<float> make_inputs<float>(const Config&, const nb::dict&, const std::vector<int64_t>&,
                                               const std::string&, uint64_t, bool);
template nb::dict forward_dict(ref::ForwardResult<float>&&);
template nb::dict backward_dict(ref::BackwardResult<float>&&);

namespace {

// The head layout from q [N, Hq, dk], k [N, Hkv, dk], v [N, Hkv, dv], with the command's message
// for head counts that do not divide.
Config config_of(const nb::dict& settings, const nb::dict& arrays) {
  auto shape = [&](const char* n) {
    if (!arrays.contains(n) || arrays[n].is_none()) throw InputError(cat(n, ": required"));
    const auto a = nb::cast<AnyArray>(arrays[n]);
    if (a.ndim() != 3)
      throw InputError(cat(n, ": rank ", a.ndim(), ", expected [T, H, D] (or [B, T, H, D] through nsa.forward)"));
    return std::array<int64_t, 3>{int64_t(a.shape(0)), int64_t(a.shape(1)), int64_t(a.shape(2))};
  };
  const auto q = shape("q"), k = shape("k"), v = shape("v");
  if (q[1] < 1 || q[2] < 1)
    throw InputError(cat("q: shape [", q[0], ", ", q[1], ", ", q[2], "] has Hq = ", q[1], " heads of dk = ", q[2],
                         "; expected Hq >= 1 and dk >= 1"));
  if (k[1] < 1) throw InputError("k: has Hkv = 0 key/value heads");
  if (v[2] < 1) throw InputError("v: has dv = 0");
  if (q[1] % k[1] != 0)
    throw InputError(cat("head counts: q has Hq = ", q[1], " query heads, k has Hkv = ", k[1],
                         " key/value heads; expected Hq a multiple of Hkv (G = Hq / Hkv query heads per group)"));
  return make_config(settings, q[1], k[1], q[2], v[2]);
}

ref::Path parse_path(const std::string& p) {
  if (p == "fast") return ref::Path::Fast;
  if (p == "oracle") return ref::Path::Oracle;
  throw ConfigError(cat("path = '", p, "' is not one of: fast, oracle"));
}

// Refuses a NaN or Inf output computed from finite inputs (the command's rule: the arithmetic
// overflowed); lse = -inf is an empty branch.
template <class S>
void check_finite(const std::string& name, const Tensor<S>& t, bool dbl) {
  const bool lse = name.rfind("lse", 0) == 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const S x = t[i];
    if (std::isfinite(x) || (lse && x == -std::numeric_limits<S>::infinity())) continue;
    throw Error(cat(name, " at index ", index_str(t.shape(), i), " is ", value_str(double(x)),
                    " although every input is finite: the ", dbl ? "double" : "float",
                    " arithmetic overflowed (inputs too large", dbl ? "" : "; try float64 inputs",
                    "); pass allow_nonfinite=True to get it anyway"));
  }
}
template <class S>
void check_finite(const ref::ForwardResult<S>& r) {
  const bool dbl = sizeof(S) == 8;
  check_finite("o", r.o, dbl);
  for (int c = 0; c < kBranches; ++c) {
    check_finite(cat("o_", branch_name(Branch(c))), r.o_branch[c], dbl);
    check_finite(cat("lse_", branch_name(Branch(c))), r.lse[c], dbl);
  }
  check_finite("block_scores", r.block_scores, dbl);
  check_finite("k_cmp_compressed", r.k_cmp_compressed, dbl);
  check_finite("v_cmp_compressed", r.v_cmp_compressed, dbl);
}

template <class S>
nb::dict forward_t(const nb::dict& settings, const nb::dict& arrays, const std::vector<int64_t>& cu, uint64_t seed,
                   const std::string& gate_act, const std::string& path, bool allow_nonfinite) {
  const Config cfg = config_of(settings, arrays);
  const auto in = make_inputs<S>(cfg, arrays, cu, gate_act, seed, allow_nonfinite);
  const ref::Path p = parse_path(path);
  ref::ForwardResult<S> r;
  {
    nb::gil_scoped_release release;  // the reference runs its own OpenMP threads
    r = ref::forward(cfg, in, p);
  }
  if (!allow_nonfinite) check_finite(r);
  return forward_dict(std::move(r));
}

template <class S>
nb::dict backward_t(const nb::dict& settings, const nb::dict& arrays, const AnyArray& dO_arr,
                    const std::vector<int64_t>& cu, uint64_t seed, const std::string& gate_act, const std::string& path,
                    bool allow_nonfinite) {
  const Config cfg = config_of(settings, arrays);
  const auto in = make_inputs<S>(cfg, arrays, cu, gate_act, seed, allow_nonfinite);
  const Tensor<S> dO = to_tensor<S>(dO_arr, "do");
  ref::check_output_grad(cfg, in, dO, allow_nonfinite, role_name);
  const ref::Path p = parse_path(path);
  nb::gil_scoped_release release;
  const auto f = ref::forward(cfg, in, p);
  auto g = ref::backward(cfg, in, f, dO, p);
  nb::gil_scoped_acquire acquire;
  return backward_dict(std::move(g));
}

template <class S>
nb::dict full_t(const nb::dict& arrays, double scale, const std::vector<int64_t>& cu, const std::string& path,
                bool allow_nonfinite) {
  nb::dict settings;
  settings["compress"] = "mean";
  settings["scale"] = scale;
  const Config cfg = config_of(settings, arrays);
  ref::Inputs<S> in;
  in.q = to_tensor<S>(nb::cast<AnyArray>(arrays["q"]), "q");
  in.k = to_tensor<S>(nb::cast<AnyArray>(arrays["k"]), "k");
  in.v = to_tensor<S>(nb::cast<AnyArray>(arrays["v"]), "v");
  in.cu_seqlens = cu;
  ref::check_inputs(cfg, in, allow_nonfinite, role_name);
  const ref::Path p = parse_path(path);
  ref::FullResult<S> r;
  {
    nb::gil_scoped_release release;
    r = ref::full_attention(cfg, in.q, in.k, in.v, in.cu_seqlens, p);
  }
  if (!allow_nonfinite) check_finite("o", r.o, sizeof(S) == 8), check_finite("lse", r.lse, sizeof(S) == 8);
  nb::dict d;
  d["o"] = to_numpy(std::move(r.o));
  d["lse"] = to_numpy(std::move(r.lse));
  return d;
}

template <class S>
nb::dict compress_params_t(const nb::dict& settings, int64_t Hkv, int64_t dk, int64_t dv, uint64_t seed) {
  const Config cfg = make_config(settings, Hkv, Hkv, dk, dv);
  auto phi = ref::random_compress_params<double>(cfg, seed).template cast<S>();
  nb::dict d;
  for (auto& [name, t] : phi_fields(phi, cfg.compress)) d[name.c_str()] = to_numpy(std::move(*t));
  return d;
}

// ---- Decoding (reference/decode.hpp) ----

template <class S>
struct Cache {
  ref::DecodeCache<S> cache;
  ref::CompressParams<S> phi;  // the layer's phi, given to every step
  std::string gate_act;
};

template <class S>
void bind_cache(nb::module_& m, const char* name) {
  using C = Cache<S>;
  nb::class_<C>(m, name)
      .def("__init__",
           [](C* self, const nb::dict& settings, const nb::dict& arrays, int64_t B, int64_t capacity, uint64_t seed,
              const std::string& gate_act) {
             // `arrays` holds one token's q, k, v (and per-branch k/v, phi) to fix the layout and sharing.
             const Config cfg = config_of(settings, arrays);
             if (B < 1) throw ConfigError(cat("batch = ", B, " is invalid: expected >= 1"));
             if (capacity < 1) throw ConfigError(cat("capacity = ", capacity, " is invalid: expected >= 1"));
             const auto in = make_inputs<S>(cfg, arrays, {}, gate_act, seed, false);
             new (self) C{ref::make_cache<S>(cfg, ref::kv_sharing(in), B, capacity), in.phi, gate_act};
           })
      .def_prop_ro("lengths", [](const C& c) { return c.cache.len; })
      .def_prop_ro("capacity", [](const C& c) { return c.cache.capacity; })
      .def("prefill",
           [](C& c, const nb::dict& arrays, const std::vector<int64_t>& cu, const std::vector<int64_t>& seqs) {
             auto in = make_inputs<S>(c.cache.cfg, arrays, cu, c.gate_act, 0, false);
             in.phi = c.phi;
             nb::gil_scoped_release release;
             auto r = ref::prefill(c.cache, in, seqs);
             nb::gil_scoped_acquire acquire;
             return forward_dict(std::move(r));
           })
      .def("step", [](C& c, const nb::dict& arrays, const std::vector<int64_t>& seqs) {
        auto in = make_inputs<S>(c.cache.cfg, arrays, {}, c.gate_act, 0, false);
        in.phi = c.phi;
        nb::gil_scoped_release release;
        auto r = ref::decode_step(c.cache, in, seqs);
        nb::gil_scoped_acquire acquire;
        return step_dict(std::move(r));
      });
}

}  // namespace

}  // namespace nsa::py

NB_MODULE(_nsa, m) {
  using namespace nsa;
  using namespace nsa::py;
  m.doc() = "The NSA reference (and CUDA path) behind the nsa package; use nsa.forward & co.";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const ConfigError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const InputError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const ResourceError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  const auto a = nb::arg("settings"), arr = nb::arg("arrays"), cu = nb::arg("cu_seqlens"), seed = nb::arg("seed"),
             act = nb::arg("gate_act"), path = nb::arg("path"), nonfin = nb::arg("allow_nonfinite");
  m.def("forward_f64", &forward_t<double>, a, arr, cu, seed, act, path, nonfin);
  m.def("forward_f32", &forward_t<float>, a, arr, cu, seed, act, path, nonfin);
  m.def("backward_f64", &backward_t<double>, a, arr, nb::arg("do"), cu, seed, act, path, nonfin);
  m.def("backward_f32", &backward_t<float>, a, arr, nb::arg("do"), cu, seed, act, path, nonfin);
  m.def("full_f64", &full_t<double>, arr, nb::arg("scale"), cu, path, nonfin);
  m.def("full_f32", &full_t<float>, arr, nb::arg("scale"), cu, path, nonfin);
  m.def("compress_params_f64", &compress_params_t<double>, a, nb::arg("Hkv"), nb::arg("dk"), nb::arg("dv"), seed);
  m.def("compress_params_f32", &compress_params_t<float>, a, nb::arg("Hkv"), nb::arg("dk"), nb::arg("dv"), seed);
  m.def("set_threads", &ref::set_threads, nb::arg("n"));
  m.def("validate", [](const nb::dict& s, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
    make_config(s, Hq, Hkv, dk, dv);
  });
  bind_cache<double>(m, "DecodeCacheF64");
  bind_cache<float>(m, "DecodeCacheF32");
  bind_compare(m);
#ifdef NSA_WITH_CUDA
  bind_cuda(m);
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
  m.def("cuda_available", [] { return false; });
#endif
}
