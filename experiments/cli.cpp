#include "cli.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>

#include "npy.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

// ---- Command ---------------------------------------------------------------------------------

Command::Command(std::string name, std::string summary)
    : name_(std::move(name)), summary_(std::move(summary)), opts_("Options") {
  opts_.add_options()("help,h", "show this help and exit")(
      "config", po::value<std::string>(), "INI file of options (key = value, names without --); the command line wins")(
      "verbose", po::bool_switch(), "print the resolved configuration to stderr");
}

std::string Command::usage() const {
  std::ostringstream os;
  os << "usage: nsa " << name_ << " [options]\n" << summary_ << "\n\n" << opts_;
  return os.str();
}

po::variables_map Command::parse(const std::vector<std::string>& args) {
  po::variables_map vm;
  try {
    // No abbreviations (Boost's default takes --prefil for --prefill): a command line means the
    // same after options are added, and a typo is refused rather than guessed.
    const int style = po::command_line_style::default_style & ~po::command_line_style::allow_guessing;
    po::store(po::command_line_parser(args).options(opts_).positional(pos_).style(style).run(), vm);
    if (vm.count("help")) {
      std::cout << usage();
      throw HelpShown{};
    }
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream f(path);
      if (!f) throw InputError(cat(path, ": cannot open config file"));
      try {
        po::store(po::parse_config_file(f, opts_), vm);  // values already set by the command line win
      } catch (const po::error& e) {
        throw UsageError(cat(path, ": ", e.what()));
      }
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm["verbose"].as<bool>()) std::cerr << resolved_config(*this, vm).dump(2) << "\n";
  return vm;
}

// ---- Option groups ----------------------------------------------------------------------------

po::options_description input_options() {
  po::options_description o("Inputs (.npy; [T, H, D] for one sequence, [B, T, H, D] for a batch)");
  o.add_options()("q", po::value<std::string>(), "queries [T, Hq, dk]")(
      "k", po::value<std::string>(), "keys [T, Hkv, dk], shared by the branches unless given per branch")(
      "v", po::value<std::string>(), "values [T, Hkv, dv]")("k-cmp", po::value<std::string>(),
                                                             "compression-branch keys (default --k)")(
      "v-cmp", po::value<std::string>(), "compression-branch values (default --v)")(
      "k-slc", po::value<std::string>(), "selection-branch keys (default --k)")(
      "v-slc", po::value<std::string>(), "selection-branch values (default --v)")(
      "k-win", po::value<std::string>(), "window-branch keys (default --k)")(
      "v-win", po::value<std::string>(), "window-branch values (default --v)")(
      "gates", po::value<std::string>(), "gate values [T, Hq, 3] in [0, 1], order (cmp, slc, win); default all ones")(
      "gate-x", po::value<std::string>(), "gate MLP input features [T, d_model] (with --gate-w, --gate-b)")(
      "gate-w", po::value<std::string>(), "gate MLP weight [d_in, 3*Hq]; column h*3+c is gate c of head h")(
      "gate-b", po::value<std::string>(), "gate MLP bias [3*Hq]")(
      "gate-w0", po::value<std::string>(), "optional gate MLP hidden layer weight [d_model, d_hidden]")(
      "gate-b0", po::value<std::string>(), "hidden layer bias [d_hidden]")(
      "gate-act", po::value<std::string>()->default_value("gelu"), "hidden activation: gelu, gelu_tanh, relu, silu")(
      "cu-seqlens", po::value<std::string>(),
      "int32/int64 [B+1] cumulative offsets: q, k, v hold B packed sequences [N, H, D]")(
      "allow-nonfinite", po::bool_switch(), "let NaN/Inf inputs through instead of refusing them");
  return o;
}

po::options_description nsa_options() {
  po::options_description o("NSA settings (docs/spec.md; defaults are the paper's)");
  o.add_options()("cmp-len", po::value<int64_t>()->default_value(32), "l: compression block length")(
      "cmp-stride", po::value<int64_t>()->default_value(16), "d: compression stride, d <= l")(
      "slc-len", po::value<int64_t>()->default_value(64), "l': selection block length")(
      "slc-count", po::value<int64_t>()->default_value(16), "n: selected blocks per query and group, forced included")(
      "window", po::value<int64_t>()->default_value(512), "w: sliding window")(
      "init-blocks", po::value<int64_t>()->default_value(1), "always-selected leading blocks")(
      "local-blocks", po::value<int64_t>()->default_value(2), "always-selected blocks ending at the query's block")(
      "compress", po::value<std::string>()->default_value("mlp"), "phi: mean, linear or mlp")(
      "compress-params", po::value<std::string>(),
      "folder of phi parameters (pe_k, w1_k, ... .npy); default: drawn from --seed")(
      "seed", po::value<uint64_t>()->default_value(0), "seed of the drawn phi parameters")(
      "cmp-hidden", po::value<int64_t>()->default_value(0), "h_c: hidden width of the mlp phi (0: the head dim)")(
      "cmp-act", po::value<std::string>()->default_value("gelu"), "mlp phi activation: gelu, gelu_tanh, relu, silu")(
      "scale", po::value<double>()->default_value(0.0), "softmax scale (0: 1/sqrt(dk))");
  return o;
}

po::options_description run_options() {
  po::options_description o("Run");
  o.add_options()("device", po::value<std::string>()->default_value("cpu"), "cpu or cuda")(
      "precision", po::value<std::string>()->default_value("double"), "CPU arithmetic: double or float")(
      "dtype", po::value<std::string>()->default_value("bf16"), "CUDA arithmetic: bf16, fp16 or fp32")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores); results do not depend on it")(
      "path", po::value<std::string>()->default_value("fast"),
      "CPU path: fast (Eigen/OpenMP) or oracle (plain loops, slow)")(
      "kernel", po::value<int>()->default_value(-1), "CUDA kernel version override (-1: automatic choice)");
  return o;
}

po::options_description output_options() {
  po::options_description o("Output");
  o.add_options()("out", po::value<std::string>(), "output folder (created if missing)");
  return o;
}

int apply_run_options(const po::variables_map& vm) {
  const int threads = vm["threads"].as<int>();
  // More threads than this only oversubscribe the cores (and each holds its own working memory).
  if (threads < 0 || threads > 1024)
    throw ConfigError(cat("threads = ", threads, " is invalid: expected 0 (all cores) to 1024"));
  const std::string dtype = vm.count("dtype") ? vm["dtype"].as<std::string>() : "bf16";
  if (dtype != "bf16" && dtype != "fp16" && dtype != "fp32")
    throw ConfigError(cat("dtype = '", dtype, "' is not one of: bf16, fp16, fp32"));
  const int kernel = vm.count("kernel") ? vm["kernel"].as<int>() : -1;
  if (kernel < -1) throw ConfigError(cat("kernel = ", kernel, " is invalid: expected -1 (automatic) or a version >= 0"));
  return ref::set_threads(threads);
}

// ---- Config -----------------------------------------------------------------------------------

namespace {
// --cmp-act and --gate-act: the message names the option.
Activation activation_option(const po::variables_map& vm, const char* opt) {
  try {
    return parse_activation(vm[opt].as<std::string>());
  } catch (const ConfigError& e) {
    throw ConfigError(cat("--", opt, ": ", e.what()));
  }
}
}  // namespace

Config block_config(const po::variables_map& vm) {
  Config c;
  c.cmp_len = vm["cmp-len"].as<int64_t>();
  c.cmp_stride = vm["cmp-stride"].as<int64_t>();
  c.slc_len = vm["slc-len"].as<int64_t>();
  c.slc_count = vm["slc-count"].as<int64_t>();
  c.window = vm["window"].as<int64_t>();
  c.init_blocks = vm["init-blocks"].as<int64_t>();
  c.local_blocks = vm["local-blocks"].as<int64_t>();
  c.compress = parse_compress_kind(vm["compress"].as<std::string>());
  c.cmp_hidden = vm["cmp-hidden"].as<int64_t>();
  c.cmp_act = activation_option(vm, "cmp-act");
  c.scale = vm["scale"].as<double>();
  return c;
}

Config make_config(const po::variables_map& vm, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
  Config c = block_config(vm);
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.validate();
  return c;
}

// ---- Workload ---------------------------------------------------------------------------------

namespace {

std::string opt_str(const po::variables_map& vm, const std::string& name) {
  return vm.count(name) ? vm[name].as<std::string>() : std::string();
}

// phi's parameter files in a --compress-params folder (docs/interface.md) and where each is loaded:
// pe_k, then w_k, b_k (linear) or w1_k, b1_k, w2_k, b2_k (mlp), then the same for _v; none for mean.
std::vector<std::pair<std::string, Tensor<double>*>> phi_tensors(ref::CompressParams<double>& phi, CompressKind kind) {
  std::vector<std::pair<std::string, Tensor<double>*>> out;
  if (kind == CompressKind::Mean) return out;
  for (auto [p, s] : {std::pair{&phi.k, "_k"}, std::pair{&phi.v, "_v"}}) {
    out.emplace_back(cat("pe", s), &p->pe);
    if (kind == CompressKind::Linear) {
      out.insert(out.end(), {{cat("w", s), &p->w}, {cat("b", s), &p->b}});
    } else {
      out.insert(out.end(), {{cat("w1", s), &p->w1}, {cat("b1", s), &p->b1}, {cat("w2", s), &p->w2}, {cat("b2", s), &p->b2}});
    }
  }
  return out;
}

// A tensor file named by an option, known by its header until it is loaded.
struct FileArg {
  std::string opt, path;  // "k", "w/k.npy"; path "" when the option is not given
  NpyHeader h;
  bool given() const { return !path.empty(); }
  std::string label() const { return cat("--", opt, " ", path); }
  double numel() const { return given() ? double(nsa::numel(h.shape)) : 0.0; }
};

// Reads the header of a file named by --opt; errors name the option and the file.
FileArg header_of(const std::string& opt, const std::string& path) {
  FileArg f{opt, path, {}};
  if (!f.given()) return f;
  try {
    f.h = read_npy_header(f.path);
  } catch (const InputError& e) {
    throw InputError(cat("--", opt, " ", e.what()));
  }
  return f;
}

// The header of the file named by --opt, with its rank checked. A per-token tensor ([N, ...], or
// [B, T, ...] for a batch) has q's leading dims, `lead` ([N] or [B, T]): checked here, so that a
// mismatched file is named before its size is planned. Other tensors (lead = null) have
// `want_rank` dims.
FileArg peek(const po::variables_map& vm, const std::string& opt, int want_rank, const Shape* lead,
             const char* layout) {
  FileArg f = header_of(opt, opt_str(vm, opt));
  if (!f.given()) return f;
  const bool batch = lead && lead->size() == 2;
  const std::string want = !lead ? cat("[", layout, "]")
                           : batch ? cat("[B = ", (*lead)[0], ", T = ", (*lead)[1], ", ", layout, "] like --q")
                                   : cat("[N = ", (*lead)[0], ", ", layout, "] like --q");
  const int rank = want_rank + (batch ? 1 : 0);
  if (int(f.h.shape.size()) != rank)
    throw InputError(cat(f.label(), ": rank ", f.h.shape.size(), " (shape ", shape_str(f.h.shape), "), expected ", want));
  if (lead && !std::equal(lead->begin(), lead->end(), f.h.shape.begin()))
    throw InputError(cat(f.label(), ": shape ", shape_str(f.h.shape), ", expected ", want));
  return f;
}

// Loads a peeked file as double. Refuses NaN/Inf (unless allowed), and for --precision float
// finite values beyond float's range, at their first position in the file's own coordinates
// (ref::check_inputs would name positions in the packed [N, ...] layout). Packs a batch
// [B, T, ...] to [B*T, ...].
Tensor<double> load(const FileArg& f, bool batched, bool allow_nonfinite, bool to_float) {
  if (!f.given()) return {};
  Tensor<double> t = npy_to_tensor<double>(read_npy(f.path), f.label());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double x = t[i];
    if (!std::isfinite(x) && !allow_nonfinite)
      throw InputError(cat(f.label(), ": non-finite value ", value_str(x), " at index ", index_str(t.shape(), i),
                           " (the first; pass --allow-nonfinite to let NaN/Inf through)"));
    if (to_float && std::isfinite(x) && std::abs(x) > std::numeric_limits<float>::max())
      throw InputError(cat(f.label(), ": value ", x, " at index ", index_str(t.shape(), i),
                           " does not fit in float (|x| <= 3.4e38); use --precision double"));
  }
  if (!batched) return t;
  Shape s(t.shape().begin() + 1, t.shape().end());
  s[0] *= t.dim(0);
  return std::move(t).reshaped(s);
}

}  // namespace

Workload load_workload(const po::variables_map& vm, bool nsa, const MemoryPlan& plan) {
  for (const char* req : {"q", "k", "v"})
    if (!vm.count(req)) throw UsageError(cat("the option '--", req, "' is required"));
  const bool allow_nonfinite = vm["allow-nonfinite"].as<bool>();
  const bool to_float = vm.count("precision") && vm["precision"].as<std::string>() == "float";
  const double start_rss = peak_rss_bytes();

  // 1. Headers. The batch layout is decided by q: rank 4 is [B, T, Hq, dk].
  const FileArg q = header_of("q", opt_str(vm, "q"));
  const Shape& qs = q.h.shape;
  const bool batched = qs.size() == 4;
  if (qs.size() != 3 && !batched)
    throw InputError(cat(q.label(), ": rank ", qs.size(), " (shape ", shape_str(qs),
                         "), expected [T, Hq, dk] or [B, T, Hq, dk]"));
  if (batched && vm.count("cu-seqlens"))
    throw InputError(cat("--cu-seqlens is for packed [N, H, D] inputs, but ", q.label(), " is a batch ",
                         shape_str(qs)));
  const Shape lead_shape = batched ? Shape{qs[0], qs[1]} : Shape{qs[0]};
  const Shape* lead = &lead_shape;
  const int64_t B = batched ? qs[0] : 0, N = batched ? qs[0] * qs[1] : qs[0];
  const int64_t Hq = qs[qs.size() - 2], dk = qs.back();
  const FileArg k = peek(vm, "k", 3, lead, "Hkv, dk"), v = peek(vm, "v", 3, lead, "Hkv, dv");
  const int64_t Hkv = k.h.shape[k.h.shape.size() - 2], dv = v.h.shape.back();
  if (Hq < 1 || dk < 1)
    throw InputError(cat(q.label(), ": shape ", shape_str(qs), " has Hq = ", Hq, " heads of dk = ", dk,
                         "; expected Hq >= 1 and dk >= 1"));
  if (Hkv < 1) throw InputError(cat(k.label(), ": shape ", shape_str(k.h.shape), " has Hkv = 0 key/value heads"));
  if (dv < 1) throw InputError(cat(v.label(), ": shape ", shape_str(v.h.shape), " has dv = 0"));
  if (Hq % Hkv != 0)
    throw InputError(cat("head counts: ", q.label(), " has Hq = ", Hq, " query heads, ", k.label(), " has Hkv = ",
                         Hkv, " key/value heads; expected Hq a multiple of Hkv (G = Hq / Hkv query heads per group)"));
  std::vector<FileArg> own;  // k_cmp, v_cmp, k_slc, v_slc, k_win, v_win
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    own.push_back(peek(vm, "k-" + b, 3, lead, "Hkv, dk"));
    own.push_back(peek(vm, "v-" + b, 3, lead, "Hkv, dv"));
  }
  const FileArg gates = peek(vm, "gates", 3, lead, "Hq, 3");
  // The gate MLP: all of --gate-x, --gate-w, --gate-b, optionally --gate-w0 with --gate-b0.
  const bool mlp = vm.count("gate-w") || vm.count("gate-x") || vm.count("gate-b") || vm.count("gate-w0") ||
                   vm.count("gate-b0");
  // Checked even without the MLP, so that a misspelt value is not silently ignored.
  const Activation gate_act = vm.count("gate-act") ? activation_option(vm, "gate-act") : Activation::Gelu;
  std::vector<FileArg> mlp_files;
  if (mlp) {
    if (vm.count("gates"))
      throw UsageError("give either --gates or the gate MLP (--gate-x/--gate-w/--gate-b), not both");
    for (const char* req : {"gate-x", "gate-w", "gate-b"})
      if (!vm.count(req)) throw UsageError(cat("the gate MLP needs --gate-x, --gate-w and --gate-b; --", req, " is missing"));
    if (vm.count("gate-w0") != vm.count("gate-b0"))
      throw UsageError("the gate MLP's hidden layer needs both --gate-w0 and --gate-b0");
    mlp_files = {peek(vm, "gate-x", 2, lead, "d_model"), peek(vm, "gate-w", 2, nullptr, "d_in, 3*Hq"),
                 peek(vm, "gate-b", 1, nullptr, "3*Hq"), peek(vm, "gate-w0", 2, nullptr, "d_model, d_hidden"),
                 peek(vm, "gate-b0", 1, nullptr, "d_hidden")};
  }
  FileArg cu_file = batched ? FileArg{"cu-seqlens", "", {}} : peek(vm, "cu-seqlens", 1, nullptr, "B+1");

  // 2. The configuration, from the options and the heads and dims of the files.
  Workload w;
  if (nsa) {
    w.cfg = make_config(vm, Hq, Hkv, dk, dv);
  } else {  // full attention: heads and scale only
    w.cfg.Hq = Hq, w.cfg.Hkv = Hkv, w.cfg.dk = dk, w.cfg.dv = dv;
    w.cfg.compress = CompressKind::Mean;
    w.cfg.scale = vm["scale"].as<double>();
    w.cfg.validate();
  }
  // phi's parameter files, when given (else drawn from --seed).
  auto& in = w.in;
  const auto phi = phi_tensors(in.phi, w.cfg.compress);
  std::vector<FileArg> phi_files;
  const bool phi_from_files = !phi.empty() && vm.count("compress-params");
  if (phi.empty() && vm.count("compress-params"))
    throw UsageError("--compress mean has no parameters; --compress-params is not used");
  if (phi_from_files) {
    const std::string dir = opt_str(vm, "compress-params");
    if (!fs::is_directory(dir)) throw InputError(cat("--compress-params ", dir, ": not a folder"));
    for (const auto& [name, t] : phi) phi_files.push_back(header_of("compress-params", (fs::path(dir) / (name + ".npy")).string()));
  }

  // 3. Memory: every input in double (plus the largest file's raw bytes while it is converted);
  // then, with the sequence lengths known, the command's outputs and working memory.
  WorkloadSizes sizes;
  sizes.cfg = w.cfg, sizes.N = N, sizes.batch = B;
  double raw = 0, elems = 0;
  for (const auto& group : {std::vector<FileArg>{q, k, v, gates, cu_file}, own, mlp_files, phi_files})
    for (const FileArg& f : group) raw = std::max(raw, double(f.h.data_bytes)), elems += f.numel();
  if (!phi.empty() && !phi_from_files) elems += ref::compress_param_count(w.cfg);
  sizes.input_bytes = 8 * elems;
  MemoryBudget budget;
  budget.add("inputs", sizes.input_bytes + raw);
  // What the process adds besides its arrays: code paged in, thread stacks, allocator slack.
  budget.add("runtime", 32e6);
  budget.require();
  if (batched) {
    w.batch = B;
    for (int64_t b = 0; b <= B; ++b) in.cu_seqlens.push_back(b * qs[1]);
  } else if (cu_file.given()) {
    const Tensor<int64_t> cu = npy_to_tensor<int64_t>(read_npy(cu_file.path), cu_file.label());
    in.cu_seqlens.assign(cu.vec().begin(), cu.vec().end());
    if (in.cu_seqlens.size() < 2)
      throw InputError(cat(cu_file.label(), ": ", in.cu_seqlens.size(), " offsets; expected B+1 >= 2 (0, ..., N = ", N,
                           ")"));
  }
  // Sequence lengths for the plan. A malformed cu_seqlens is planned as one sequence and named by
  // ref::check_inputs after loading.
  const auto& cu = in.cu_seqlens;
  const bool cu_ok = !cu.empty() && cu.front() == 0 && cu.back() == N && std::is_sorted(cu.begin(), cu.end());
  if (!cu_ok) sizes.seqlens = {N};
  for (size_t b = 0; cu_ok && b + 1 < cu.size(); ++b) sizes.seqlens.push_back(cu[b + 1] - cu[b]);
  if (mlp) sizes.gate_hidden = mlp_files[3].given() ? mlp_files[3].h.shape[1] : mlp_files[0].h.shape.back();
  if (plan) plan(sizes, budget);
  budget.require();
  w.memory = budget.to_json();
  w.memory["start_rss_bytes"] = start_rss;

  // 4. The data.
  std::map<std::string, std::string> files;  // role -> "--opt path", for ref::check_inputs' messages
  auto take = [&](const FileArg& f, const std::string& role, bool per_token) {
    if (f.given()) files[role] = f.label();
    return load(f, per_token && batched, allow_nonfinite, to_float);
  };
  in.q = take(q, "q", true);
  in.k = take(k, "k", true);
  in.v = take(v, "v", true);
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    in.k_own[c] = take(own[2 * c], "k_" + b, true);
    in.v_own[c] = take(own[2 * c + 1], "v_" + b, true);
  }
  in.gates = take(gates, "gates", true);
  if (mlp) {
    in.gate_mlp.x = take(mlp_files[0], "gate_x", true);
    in.gate_mlp.w = take(mlp_files[1], "gate_w", false);
    in.gate_mlp.b = take(mlp_files[2], "gate_b", false);
    in.gate_mlp.w0 = take(mlp_files[3], "gate_w0", false);
    in.gate_mlp.b0 = take(mlp_files[4], "gate_b0", false);
    in.gate_mlp.act = gate_act;
  }
  if (cu_file.given()) files["cu_seqlens"] = cu_file.label();
  if (phi_from_files) {
    for (size_t i = 0; i < phi.size(); ++i) *phi[i].second = take(phi_files[i], phi[i].first, false);
  } else if (!phi.empty()) {
    const uint64_t seed = vm["seed"].as<uint64_t>();
    in.phi = ref::random_compress_params<double>(w.cfg, seed);
    for (const auto& [name, t] : phi) files[name] = cat(name, " (drawn from --seed ", seed, ")");
  }
  const auto namer = [files](const std::string& role) {
    const auto it = files.find(role);
    return it == files.end() ? role : it->second;
  };
  // Finiteness was checked per file above, in the files' own coordinates.
  ref::check_inputs(w.cfg, in, /*allow_nonfinite=*/true, namer);
  w.seqlens = sizes.seqlens;
  return w;
}

// ---- Compression parameters ------------------------------------------------------------------

std::vector<std::string> compress_param_names(CompressKind kind) {
  std::vector<std::string> names;
  for (const char* s : {"_k", "_v"}) {
    names.push_back(cat("pe", s));
    if (kind == CompressKind::Linear)
      for (const char* n : {"w", "b"}) names.push_back(cat(n, s));
    else
      for (const char* n : {"w1", "b1", "w2", "b2"}) names.push_back(cat(n, s));
  }
  return names;
}

namespace {
// The tensors of one PhiParams in the order of compress_param_names (half of it: pe, then w, b or
// w1, b1, w2, b2).
template <class P>
std::vector<decltype(&std::declval<P&>().pe)> phi_fields(P& p, CompressKind kind) {
  if (kind == CompressKind::Linear) return {&p.pe, &p.w, &p.b};
  return {&p.pe, &p.w1, &p.b1, &p.w2, &p.b2};
}
}  // namespace

ref::CompressParams<double> load_compress_params(const std::string& dir, CompressKind kind) {
  ref::CompressParams<double> phi;
  if (kind == CompressKind::Mean) return phi;
  const auto names = compress_param_names(kind);
  size_t i = 0;
  for (auto* p : {&phi.k, &phi.v})
    for (auto* t : phi_fields(*p, kind)) *t = load_npy<double>((fs::path(dir) / (names[i++] + ".npy")).string());
  return phi;
}

template <class S>
void add_compress_params(OutputDir& out, const ref::CompressParams<S>& phi, CompressKind kind) {
  if (kind == CompressKind::Mean) return;
  const auto names = compress_param_names(kind);
  size_t i = 0;
  for (const auto* p : {&phi.k, &phi.v})
    for (const auto* t : phi_fields(*p, kind)) out.add(names[i++], *t);
}
template void add_compress_params(OutputDir&, const ref::CompressParams<double>&, CompressKind);
template void add_compress_params(OutputDir&, const ref::CompressParams<float>&, CompressKind);

ref::Path parse_path(const po::variables_map& vm) {
  const std::string p = vm["path"].as<std::string>();
  if (p == "fast") return ref::Path::Fast;
  if (p == "oracle") return ref::Path::Oracle;
  throw ConfigError(cat("path = '", p, "' is not one of: fast, oracle"));
}

bool use_double(const po::variables_map& vm) {
  const std::string p = vm["precision"].as<std::string>();
  if (p != "double" && p != "float") throw ConfigError(cat("precision = '", p, "' is not one of: double, float"));
  return p == "double";
}

json workload_json(const Workload& w) {
  return {{"N", w.in.N()}, {"batch", w.batch}, {"seqlens", w.seqlens}, {"shared_kv", w.in.all_shared()}};
}

// ---- Output -----------------------------------------------------------------------------------

OutputDir::OutputDir(std::string dir) : dir_(std::move(dir)) {
  if (dir_.empty()) throw UsageError("the option '--out' is required");
  // Remember the folders that do not exist yet, outermost first, to remove them on failure.
  for (fs::path p = fs::absolute(dir_).lexically_normal(); !p.empty() && !fs::exists(p); p = p.parent_path()) {
    created_.insert(created_.begin(), p.string());
    if (p == p.parent_path()) break;
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_)) {
    created_.clear();  // nothing of ours to remove
    throw InputError(cat(dir_, ": cannot create output folder (", ec ? ec.message() : "a file of that name exists", ")"));
  }
}

OutputDir::~OutputDir() {
  if (committed_) return;
  for (const auto& s : staged_) std::remove(s.first.c_str());
  std::error_code ec;
  for (auto it = created_.rbegin(); it != created_.rend(); ++it) fs::remove(*it, ec);  // only if empty
}

std::ofstream OutputDir::stage(const std::string& filename, std::string& final_path) {
  final_path = (fs::path(dir_) / filename).string();
  const std::string tmp = (fs::path(dir_) / cat(".", filename, ".tmp-", ::getpid())).string();
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  if (!f) throw InputError(cat(final_path, ": cannot create file"));
  staged_.push_back({tmp, final_path});
  return f;
}

void OutputDir::add_text(const std::string& filename, const std::string& text) {
  std::string final_path;
  std::ofstream f = stage(filename, final_path);
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  f.flush();
  if (!f) throw InputError(cat(final_path, ": write failed (disk full?)"));
}

template <class T>
void OutputDir::add(const std::string& name, const Tensor<T>& t) {
  std::string final_path;
  std::ofstream f = stage(name + ".npy", final_path);
  const std::string header = npy_header_bytes<T>(t.shape());
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(t.data()), static_cast<std::streamsize>(t.numel() * sizeof(T)));
  f.flush();
  if (!f) throw InputError(cat(final_path, ": write failed (disk full?)"));
}

void OutputDir::commit() {
  for (const auto& s : staged_)
    if (std::rename(s.first.c_str(), s.second.c_str()) != 0)
      throw InputError(cat(s.second, ": cannot move the finished file into place"));
  committed_ = true;
}

template void OutputDir::add<double>(const std::string&, const Tensor<double>&);
template void OutputDir::add<float>(const std::string&, const Tensor<float>&);
template void OutputDir::add<int32_t>(const std::string&, const Tensor<int32_t>&);
template void OutputDir::add<int64_t>(const std::string&, const Tensor<int64_t>&);

// ---- JSON -------------------------------------------------------------------------------------

namespace {
json any_to_json(const boost::any& a) {
  if (a.empty()) return nullptr;
  if (auto p = boost::any_cast<std::string>(&a)) return *p;
  if (auto p = boost::any_cast<int64_t>(&a)) return *p;
  if (auto p = boost::any_cast<uint64_t>(&a)) return *p;
  if (auto p = boost::any_cast<int>(&a)) return *p;
  if (auto p = boost::any_cast<double>(&a)) return *p;
  if (auto p = boost::any_cast<bool>(&a)) return *p;
  if (auto p = boost::any_cast<std::vector<std::string>>(&a)) return *p;
  return "?";
}
}  // namespace

json resolved_config(const Command& cmd, const po::variables_map& vm) {
  json j;
  j["command"] = "nsa " + cmd.name();
  json opts = json::object();
  for (const auto& kv : vm) {
    if (kv.first == "help") continue;
    opts[kv.first] = any_to_json(kv.second.value());
  }
  j["options"] = opts;
  return j;
}

json config_json(const Config& c) {
  return {{"Hq", c.Hq},
          {"Hkv", c.Hkv},
          {"G", c.G()},
          {"dk", c.dk},
          {"dv", c.dv},
          {"cmp_len", c.cmp_len},
          {"cmp_stride", c.cmp_stride},
          {"compress", to_string(c.compress)},
          {"cmp_hidden_k", c.hidden_k()},
          {"cmp_hidden_v", c.hidden_v()},
          {"cmp_act", to_string(c.cmp_act)},
          {"slc_len", c.slc_len},
          {"slc_count", c.slc_count},
          {"init_blocks", c.init_blocks},
          {"local_blocks", c.local_blocks},
          {"window", c.window},
          {"scale", c.softmax_scale()}};
}

std::string csv_num(double x) {
  if (std::isnan(x)) return "nan";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", x);
  return buf;
}

json json_num(double x) { return std::isnan(x) ? json(nullptr) : json(x); }

template <class T>
Tensor<T> unpack(const Tensor<T>& t, int64_t batch) {
  if (batch <= 0) return t;
  Shape s = t.shape();
  s.insert(s.begin(), batch);
  s[1] /= batch;
  return t.reshaped(s);
}
template Tensor<double> unpack(const Tensor<double>&, int64_t);
template Tensor<float> unpack(const Tensor<float>&, int64_t);
template Tensor<int32_t> unpack(const Tensor<int32_t>&, int64_t);

// ---- Memory -----------------------------------------------------------------------------------

namespace {
// The first number in a file (cgroup limits: a byte count, or "max" for none).
double read_number(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s)) return -1;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  return end && *end == '\0' && v >= 0 ? v : -1;
}
}  // namespace

AvailableMemory available_memory() {
  AvailableMemory a{std::numeric_limits<double>::infinity(), "unknown"};
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  double kb;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") {
      a = {kb * 1024.0, "MemAvailable in /proc/meminfo"};
      break;
    }
  // A container's limit may be far below the machine's: cgroup v2, else v1.
  for (const auto& [limit, usage] : {std::pair{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
                                     {"/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                      "/sys/fs/cgroup/memory/memory.usage_in_bytes"}}) {
    const double lim = read_number(limit), use = read_number(usage);
    if (lim >= 0 && use >= 0 && lim < 1e18) {
      if (lim - use < a.bytes) a = {std::max(lim - use, 0.0), cat("the cgroup's limit in ", limit, " less its usage")};
      break;
    }
  }
  if (const char* cap = std::getenv("NSA_MAX_MEMORY")) {
    char* end = nullptr;
    const double v = std::strtod(cap, &end);
    if (!(end && *end == '\0' && v >= 0))
      throw ConfigError(cat("NSA_MAX_MEMORY = '", cap, "' is invalid: expected a number of bytes"));
    if (v < a.bytes) a = {v, "the environment variable NSA_MAX_MEMORY"};
  }
  return a;
}

double available_memory_bytes() { return available_memory().bytes; }

std::string human_bytes(double b) {
  const char* units[] = {"bytes", "kB", "MB", "GB", "TB", "PB"};
  int u = 0;
  while (b >= 1000 && u < 5) b /= 1000, ++u;
  std::ostringstream os;
  os << std::setprecision(u ? 3 : 15) << b << " " << units[u];
  return os.str();
}

double MemoryBudget::total() const {
  double t = 0;
  for (const auto& p : parts_) t += p.second;
  return t;
}

void MemoryBudget::require() const {
  const double need = total();
  const AvailableMemory have = available_memory();
  if (need <= have.bytes) return;
  std::string parts;
  for (const auto& p : parts_) parts += cat(parts.empty() ? "" : ", ", p.first, " ", human_bytes(p.second));
  throw ResourceError(cat("not enough memory: this run needs ", std::fixed, std::setprecision(0), need, " bytes (",
                          human_bytes(need), ": ", parts, "), but ", have.bytes, " bytes (", human_bytes(have.bytes),
                          ") are available (", have.source, "); nothing was computed"));
}

json MemoryBudget::to_json() const {
  json parts = json::object();
  for (const auto& p : parts_) parts[p.first] = p.second;
  return {{"estimate_bytes", total()}, {"parts", parts}};
}

double peak_rss_bytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;  // kB on Linux
}

json memory_report(const Workload& w) {
  json j = w.memory;
  j["peak_rss_bytes"] = peak_rss_bytes();
  return j;
}

void require_memory(double bytes, const std::string& what) {
  MemoryBudget b;
  b.add(what, bytes);
  b.require();
}

}  // namespace nsa::cli
