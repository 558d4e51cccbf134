// The command line's inputs: the workload of a subcommand (its tensor files, checked by header
// before anything is loaded, and the memory the run will take) and phi's parameter files.
#include "cli.hpp"

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

}  // namespace nsa::cli
