// `nsa backward`: the gradients of NSA (docs/spec.md 7) for a given dL/do; and `nsa gradcheck`,
// which checks the files `nsa backward` wrote against central finite differences of the forward
// pass, entry by sampled entry, through the same loading code.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <iostream>
#include <limits>
#include <set>

#include "cli.hpp"
#include "commands.hpp"
#include "npy.hpp"
#include "rng.hpp"
#ifdef NSA_WITH_CUDA
#include "nsa_cuda.hpp"
#endif

namespace nsa::cli {

namespace {

namespace fs = std::filesystem;

// The gradient files of a backward result (docs/interface.md), in a fixed order: dq; dk_c, dv_c for
// each branch; dk, dv when some branch reads the shared k, v; dgates; d<name> for each of phi's
// parameter files in use; the gate MLP's dgate_x, dgate_w, dgate_b (dgate_w0, dgate_b0).
template <class S>
void for_each_gradient(const ref::BackwardResult<S>& g, const std::function<void(const std::string&, const Tensor<S>&, bool per_token)>& f) {
  f("dq", g.dq, true);
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    f("dk_" + b, g.dk_branch[c], true);
    f("dv_" + b, g.dv_branch[c], true);
  }
  if (!g.dk.empty()) f("dk", g.dk, true);
  if (!g.dv.empty()) f("dv", g.dv, true);
  f("dgates", g.dgates, true);
  for (int kv = 0; kv < 2; ++kv) {
    const ref::PhiParams<S>& p = kv ? g.dphi.v : g.dphi.k;
    const std::string s = kv ? "_v" : "_k";
    for (const auto& [name, t] : {std::pair{"pe", &p.pe}, {"w", &p.w}, {"b", &p.b}, {"w1", &p.w1}, {"b1", &p.b1},
                                  {"w2", &p.w2}, {"b2", &p.b2}})
      if (!t->empty()) f(cat("d", name, s), *t, false);
  }
  const auto& m = g.dgate_mlp;
  if (!m.x.empty()) {
    f("dgate_x", m.x, true);
    f("dgate_w", m.w, false);
    f("dgate_b", m.b, false);
    if (!m.w0.empty()) {
      f("dgate_w0", m.w0, false);
      f("dgate_b0", m.b0, false);
    }
  }
}

// dL/do from --do: [T, Hq, dv], or [B, T, Hq, dv] when the inputs are a batch; packed like q.
Tensor<double> load_do(const po::variables_map& vm, const Workload& w, bool allow_nonfinite) {
  if (!vm.count("do")) throw UsageError("the option '--do' is required (dL/do, shaped like the output o)");
  const std::string path = vm["do"].as<std::string>();
  Tensor<double> dO = load_npy<double>(path);
  if (w.batch > 0) {
    if (dO.rank() != 4 || dO.dim(0) != w.batch)
      throw InputError(cat(path, ": shape ", shape_str(dO.shape()), ", expected a batch [B = ", w.batch,
                           ", T, Hq, dv] like --q"));
    dO = std::move(dO).reshaped({dO.dim(0) * dO.dim(1), dO.dim(2), dO.dim(3)});
  }
  ref::check_output_grad(w.cfg, w.in, dO, allow_nonfinite, [&](const std::string&) { return "--do " + path; });
  return dO;
}

// Bytes the backward pass holds beyond its inputs: the forward's results, the gradients, and the
// chunks' partial key gradients (reference/backward.cpp: max(32, sequences x groups) chunks, each
// holding at most a prefix of its sequence for the selection and as much again for the others).
double backward_bytes(const Workload& w, int elem) {
  const Config& c = w.cfg;
  const double N = double(w.in.N());
  int64_t Tmax = 0;
  for (int64_t T : w.seqlens) Tmax = std::max(Tmax, T);
  const double fwd = N * c.Hq * (4.0 * c.dv + 6) + N * c.Hkv * (double(c.num_slc_blocks(Tmax)) + c.slc_count);
  const double grads = N * c.Hq * (c.dk + 3) + 4.0 * N * c.Hkv * (c.dk + c.dv);
  const double chunks = std::max(32.0, double(w.seqlens.size()) * double(c.Hkv));
  const double partial = chunks * 2 * double(Tmax) * (c.dk + c.dv);
  return (fwd + grads + partial) * elem + 64e6 * 2;
}

template <class S>
void write_backward(const Workload& w, const ref::BackwardResult<S>& g, OutputDir& out) {
  for_each_gradient<S>(g, [&](const std::string& name, const Tensor<S>& t, bool per_token) {
    out.add(name, per_token ? unpack(t, w.batch) : t);
  });
}

}  // namespace

int cmd_backward(const Args& args) {
  Command cmd("backward",
              "NSA backward pass (docs/spec.md 7): the gradients of a loss L given dL/do (--do), for q, each\n"
              "branch's keys and values (and the shared k, v), the gates, phi's parameters and the gate MLP.\n"
              "Selected blocks are held fixed. Writes dq.npy, dk_cmp.npy, ... into --out.");
  cmd.add(input_options());
  po::options_description g("Gradient");
  g.add_options()("do", po::value<std::string>(), "dL/do [T, Hq, dv] (or [B, T, Hq, dv]), shaped like the output o")(
      "deterministic", po::bool_switch(),
      "CUDA: no floating-point atomics, bitwise repeatable (slower; see docs/cuda_backward.md)");
  cmd.add(g);
  cmd.add(nsa_options());
  cmd.add(run_options());
  cmd.add(bwd_variant_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const bool on_cuda = use_cuda_device(vm, "backward");
  const bool dbl = !on_cuda && use_double(vm);
  const ref::Path path = parse_path(vm);
  check_cuda_options(vm);
  Workload w = load_workload(vm);
  const Tensor<double> dO = load_do(vm, w, vm["allow-nonfinite"].as<bool>());
  require_memory(backward_bytes(w, dbl ? 8 : 4), "the backward pass");
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());
  double fwd_s = 0, bwd_s = 0;
  std::string arith = dbl ? "double" : "float";
  json device_json;
  auto run = [&](const auto& in, const auto& d) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto f = ref::forward(w.cfg, in, path);
    const auto t1 = std::chrono::steady_clock::now();
    const auto grads = ref::backward(w.cfg, in, f, d, path);
    const auto t2 = std::chrono::steady_clock::now();
    fwd_s = std::chrono::duration<double>(t1 - t0).count();
    bwd_s = std::chrono::duration<double>(t2 - t1).count();
    write_backward(w, grads, out);
  };
  if (on_cuda) {
#ifdef NSA_WITH_CUDA
    // The device rounds the inputs and dL/do to --dtype, runs its forward pass (whose selected
    // blocks the gradients hold fixed) and the backward pass, and returns fp32 gradients.
    cuda::Options opt = cuda_options(vm);
    opt.deterministic = vm["deterministic"].as<bool>();
    opt.backward = true;
    opt.intermediates = false;
    const auto t0 = std::chrono::steady_clock::now();
    cuda::Plan plan(w.cfg, w.in.N(), w.in.cu_seqlens, opt);
    plan.upload(w.in.cast<float>());
    plan.run();
    plan.upload_grad(dO.cast<float>());
    plan.run_backward();
    write_backward(w, plan.download_grads(), out);
    bwd_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    arith = cat("cuda ", cuda::to_string(opt.dtype), " ", plan.kernels().summary(), " backward=",
                cuda::to_string(plan.kernels().backward.variant), opt.deterministic ? " deterministic" : "");
    device_json = {{"name", cuda::device_name()}, {"dtype", cuda::to_string(opt.dtype)},
                   {"kernels", kernels_json(plan.kernels())}, {"deterministic", opt.deterministic}};
#endif
  } else if (dbl) {
    run(w.in, dO);
  } else {
    run(w.in.cast<float>(), dO.cast<float>());
  }
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(w.cfg);
  j["workload"] = workload_json(w);
  if (on_cuda) {
    j["seconds"] = bwd_s;  // forward + backward, uploads and downloads included
    j["cuda"] = device_json;
  } else {
    j["forward_seconds"] = fwd_s;
    j["backward_seconds"] = bwd_s;
  }
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "backward: " << w.in.N() << " tokens in " << w.seqlens.size() << " sequence(s), Hq=" << w.cfg.Hq
            << " Hkv=" << w.cfg.Hkv << " dk=" << w.cfg.dk << " dv=" << w.cfg.dv << ", " << arith << ", ";
  if (on_cuda) std::cout << "forward + backward " << bwd_s << " s -> " << out.dir() << "\n";
  else std::cout << "forward " << fwd_s << " s + backward " << bwd_s << " s -> " << out.dir() << "\n";
  return 0;
}

namespace {

// The input whose gradient file `name` holds, in a copy of the workload's inputs that still
// computes the same forward pass: dk_c of a branch reading the shared k gets its own copy of k
// (so that only that branch's keys move), and dgates, for gates computed or all ones, gets the
// gate values themselves as a given tensor.
Tensor<double>* input_of(const std::string& name, ref::Inputs<double>& in, const Tensor<double>& gates) {
  if (name == "dq") return &in.q;
  if (name == "dk") return &in.k;
  if (name == "dv") return &in.v;
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    for (int kv = 0; kv < 2; ++kv)
      if (name == cat(kv ? "dv_" : "dk_", b)) {
        Tensor<double>& own = kv ? in.v_own[c] : in.k_own[c];
        if (own.empty()) own = kv ? in.v : in.k;
        return &own;
      }
  }
  if (name == "dgates") {
    if (in.gates.empty()) in.gates = gates;
    return &in.gates;
  }
  auto& m = in.gate_mlp;
  for (const auto& [n, t] : {std::pair{"dgate_x", &m.x}, {"dgate_w", &m.w}, {"dgate_b", &m.b}, {"dgate_w0", &m.w0},
                             {"dgate_b0", &m.b0}})
    if (name == n) return t;
  for (int kv = 0; kv < 2; ++kv) {
    ref::PhiParams<double>& p = kv ? in.phi.v : in.phi.k;
    for (const auto& [n, t] : {std::pair{"pe", &p.pe}, {"w", &p.w}, {"b", &p.b}, {"w1", &p.w1}, {"b1", &p.b1},
                               {"w2", &p.w2}, {"b2", &p.b2}})
      if (name == cat("d", n, kv ? "_v" : "_k")) return t;
  }
  throw InputError(cat(name, ": not a gradient `nsa backward` writes"));
}

}  // namespace

int cmd_gradcheck(const Args& args) {
  Command cmd("gradcheck",
              "Check the gradient files of `nsa backward` (--grads DIR) against central finite differences of\n"
              "L = <dL/do, o> through the forward pass, in double, on sampled entries of every file (the\n"
              "largest entry among them). Entries whose perturbation changes the selected blocks are skipped\n"
              "(the gradient holds them fixed). Prints one line per file; exits 1 if any entry fails.");
  cmd.add(input_options());
  po::options_description g("Gradient check");
  g.add_options()("do", po::value<std::string>(), "dL/do given to `nsa backward`")(
      "grads", po::value<std::string>(), "the folder `nsa backward` wrote")(
      "samples", po::value<int>()->default_value(6), "entries checked per gradient file")(
      "step", po::value<double>()->default_value(1e-6), "relative step h (times max(1, |x|))")(
      "rtol", po::value<double>()->default_value(1e-6),
      "tolerance: |fd - g| <= rtol |g| + the difference quotient's round-off")(
      "sample-seed", po::value<uint64_t>()->default_value(0), "seed of the sampled entries");
  cmd.add(g);
  cmd.add(nsa_options());
  po::options_description r("Run");
  r.add_options()("device", po::value<std::string>()->default_value("cpu"), "cpu")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)");
  cmd.add(r);
  const auto vm = cmd.parse(args);
  if (!vm.count("grads")) throw UsageError("the option '--grads' is required");
  require_cpu_device(vm, "gradcheck");
  const Workload w = load_workload(vm);
  const Tensor<double> dO = load_do(vm, w, false);
  const std::string dir = vm["grads"].as<std::string>();
  const int samples = vm["samples"].as<int>();
  const double step = vm["step"].as<double>(), rtol = vm["rtol"].as<double>();
  if (samples < 1 || !(step > 0) || !(rtol >= 0))
    throw ConfigError(cat("samples = ", samples, ", step = ", step, ", rtol = ", rtol,
                          ": expected samples >= 1, step > 0, rtol >= 0"));
  ref::set_threads(vm["threads"].as<int>());
  const Config& cfg = w.cfg;
  const auto base = ref::forward(cfg, w.in);
  // The files a backward pass of this workload writes: computed here only for their names.
  std::vector<std::string> names;
  for_each_gradient<double>(ref::backward(cfg, w.in, base, dO),
                            [&](const std::string& n, const Tensor<double>&, bool) { names.push_back(n); });
  std::set<std::string> extra;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".npy") extra.insert(e.path().stem().string());
  Rng rng(vm["sample-seed"].as<uint64_t>());
  bool all_pass = true;
  std::cout << "gradcheck: " << dir << ", " << samples << " entries per file, h = " << step
            << " max(1, |x|), rtol = " << rtol << "\n";
  for (const std::string& name : names) {
    const std::string file = (fs::path(dir) / (name + ".npy")).string();
    extra.erase(name);
    if (!fs::exists(file)) {
      std::cout << "  " << std::left << std::setw(10) << name << std::right << " MISSING " << file << "\n";
      all_pass = false;
      continue;
    }
    const Tensor<double> grad = load_npy<double>(file);
    ref::Inputs<double> in = w.in;
    Tensor<double>* x = input_of(name, in, base.gates);
    if (grad.numel() != x->numel())
      throw InputError(cat(file, ": ", grad.numel(), " entries (shape ", shape_str(grad.shape()), "), expected ",
                           x->numel(), " like its input ", shape_str(x->shape())));
    int64_t argmax = 0;
    for (int64_t i = 0; i < grad.numel(); ++i)
      if (std::abs(grad[i]) > std::abs(grad[argmax])) argmax = i;
    double worst = 0;
    int checked = 0, skipped = 0;
    for (int tries = 0; checked < samples && tries < 20 * samples && grad.numel() > 0; ++tries) {
      const int64_t i = tries == 0 ? argmax : int64_t(rng.below(uint64_t(grad.numel())));
      const double x0 = (*x)[i], h = step * std::max(1.0, std::abs(x0));
      (*x)[i] = x0 + h;
      const auto plus = ref::forward(cfg, in);
      (*x)[i] = x0 - h;
      const auto minus = ref::forward(cfg, in);
      (*x)[i] = x0;
      if (plus.block_idx.vec() != base.block_idx.vec() || minus.block_idx.vec() != base.block_idx.vec()) {
        ++skipped;
        continue;
      }
      // (L(x+h) - L(x-h)) / 2h with the outputs' difference taken first; its round-off is about
      // eps ||dO * o||_2 / 2h (each output carries a few eps of relative error), taken 10x.
      double s = 0, mag = 0;
      for (int64_t e = 0; e < dO.numel(); ++e) {
        s += dO[e] * (plus.o[e] - minus.o[e]);
        mag += dO[e] * dO[e] * plus.o[e] * plus.o[e];
      }
      const double two_h = (x0 + h) - (x0 - h), fd = s / two_h;
      const double noise = 10 * std::numeric_limits<double>::epsilon() * std::sqrt(mag) / two_h;
      const double err = std::abs(fd - grad[i]) / std::max({std::abs(grad[i]), noise / std::max(rtol, 1e-300), 1e-300});
      worst = std::max(worst, err);
      if (std::abs(fd - grad[i]) > rtol * std::abs(grad[i]) + noise) {
        all_pass = false;
        std::cout << "  " << name << " entry " << i << ": finite difference " << std::setprecision(12) << fd
                  << ", file " << grad[i] << std::setprecision(6) << "\n";
      }
      ++checked;
    }
    const bool pass = worst <= rtol && checked == std::min<int64_t>(samples, grad.numel());
    all_pass = all_pass && pass;
    std::cout << "  " << std::left << std::setw(10) << name << std::right << " " << std::setw(16)
              << shape_str(grad.shape()) << "  " << checked << " entries (" << skipped
              << " skipped: selection changed)  worst rel err " << std::scientific << std::setprecision(2) << worst
              << std::defaultfloat << "  " << (pass ? "PASS" : "FAIL") << "\n";
  }
  for (const auto& e : extra)
    if (e.size() > 1 && e[0] == 'd' && e != "do")
      std::cout << "  " << e << ".npy: not a gradient of this workload (ignored)\n";
  std::cout << (all_pass ? "PASS" : "FAIL") << ": " << names.size() << " gradient files checked\n";
  return all_pass ? 0 : 1;
}

}  // namespace nsa::cli
