#include "cli.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
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
    po::store(po::command_line_parser(args).options(opts_).positional(pos_).run(), vm);
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
  po::options_description o("NSA settings (NSA-SPEC.md; defaults are the paper's)");
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

// ---- Config -----------------------------------------------------------------------------------

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
  c.cmp_act = parse_activation(vm["cmp-act"].as<std::string>());
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

// Loads a tensor named by an option; packs [B, T, ...] to [B*T, ...] when `batched`.
Tensor<double> load_opt(const po::variables_map& vm, const std::string& opt, int want_rank, bool batched,
                        std::map<std::string, std::string>& files, const std::string& role) {
  const std::string path = opt_str(vm, opt);
  if (path.empty()) return {};
  files[role] = cat("--", opt, " ", path);
  Tensor<double> t = load_npy<double>(path);
  const int rank = want_rank + (batched ? 1 : 0);
  if (t.rank() != rank)
    throw InputError(cat(path, ": rank ", t.rank(), " (shape ", shape_str(t.shape()), "), expected rank ", rank,
                         batched ? " (a batch [B, T, ...] like --q)" : " (like --q)"));
  if (!batched) return t;
  Shape s(t.shape().begin() + 1, t.shape().end());
  s[0] *= t.dim(0);
  return std::move(t).reshaped(s);
}

}  // namespace

Workload load_workload(const po::variables_map& vm, bool nsa) {
  for (const char* req : {"q", "k", "v"})
    if (!vm.count(req)) throw UsageError(cat("the option '--", req, "' is required"));
  Workload w;
  std::map<std::string, std::string> files;
  const std::string qpath = opt_str(vm, "q");
  files["q"] = cat("--q ", qpath);
  // The batch layout is decided by q: rank 4 is [B, T, Hq, dk].
  Tensor<double> q = load_npy<double>(qpath);
  const bool batched = q.rank() == 4;
  if (q.rank() != 3 && !batched)
    throw InputError(cat(qpath, ": rank ", q.rank(), " (shape ", shape_str(q.shape()),
                         "), expected [T, Hq, dk] or [B, T, Hq, dk]"));
  if (batched && vm.count("cu-seqlens"))
    throw InputError(cat("--cu-seqlens is for packed [N, H, D] inputs, but ", qpath, " is a batch ",
                         shape_str(q.shape())));
  auto& in = w.in;
  const int64_t B = batched ? q.dim(0) : 0, T = batched ? q.dim(1) : q.dim(0);
  if (batched) {
    const Shape packed{B * T, q.dim(2), q.dim(3)};
    q = std::move(q).reshaped(packed);
  }
  in.q = std::move(q);
  in.k = load_opt(vm, "k", 3, batched, files, "k");
  in.v = load_opt(vm, "v", 3, batched, files, "v");
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    in.k_own[c] = load_opt(vm, "k-" + b, 3, batched, files, "k_" + b);
    in.v_own[c] = load_opt(vm, "v-" + b, 3, batched, files, "v_" + b);
  }
  in.gates = load_opt(vm, "gates", 3, batched, files, "gates");
  if (vm.count("gate-w") || vm.count("gate-x") || vm.count("gate-b")) {
    if (!in.gates.empty()) throw UsageError("give either --gates or the gate MLP (--gate-x/--gate-w/--gate-b), not both");
    for (const char* req : {"gate-x", "gate-w", "gate-b"})
      if (!vm.count(req)) throw UsageError(cat("the gate MLP needs --gate-x, --gate-w and --gate-b; --", req, " is missing"));
    in.gate_mlp.x = load_opt(vm, "gate-x", 2, batched, files, "gate_x");
    in.gate_mlp.w = load_opt(vm, "gate-w", 2, false, files, "gate_w");
    in.gate_mlp.b = load_opt(vm, "gate-b", 1, false, files, "gate_b");
    in.gate_mlp.w0 = load_opt(vm, "gate-w0", 2, false, files, "gate_w0");
    in.gate_mlp.b0 = load_opt(vm, "gate-b0", 1, false, files, "gate_b0");
    in.gate_mlp.act = parse_activation(vm["gate-act"].as<std::string>());
  }
  if (batched) {
    w.batch = B;
    for (int64_t b = 0; b <= w.batch; ++b) in.cu_seqlens.push_back(b * T);
  } else if (vm.count("cu-seqlens")) {
    const std::string path = opt_str(vm, "cu-seqlens");
    files["cu_seqlens"] = cat("--cu-seqlens ", path);
    const Tensor<int64_t> cu = load_npy<int64_t>(path);
    if (cu.rank() != 1) throw InputError(cat(path, ": shape ", shape_str(cu.shape()), ", expected [B+1]"));
    in.cu_seqlens.assign(cu.vec().begin(), cu.vec().end());
  }
  if (in.k.rank() != 3 || in.v.rank() != 3)
    throw InputError(cat(opt_str(vm, in.k.rank() != 3 ? "k" : "v"), ": expected [T, Hkv, D]"));
  if (nsa) {
    w.cfg = make_config(vm, in.q.dim(1), in.k.dim(1), in.q.dim(2), in.v.dim(2));
  } else {  // full attention: heads and scale only
    w.cfg.Hq = in.q.dim(1), w.cfg.Hkv = in.k.dim(1), w.cfg.dk = in.q.dim(2), w.cfg.dv = in.v.dim(2);
    w.cfg.compress = CompressKind::Mean;
    w.cfg.scale = vm["scale"].as<double>();
    w.cfg.validate();
  }
  // phi's parameters: from files, or drawn from --seed.
  if (w.cfg.compress != CompressKind::Mean) {
    if (vm.count("compress-params")) {
      const std::string dir = opt_str(vm, "compress-params");
      auto load_param = [&](const std::string& name) {
        const std::string path = (fs::path(dir) / (name + ".npy")).string();
        files[name] = path;
        return load_npy<double>(path);
      };
      const bool lin = w.cfg.compress == CompressKind::Linear;
      for (int kv = 0; kv < 2; ++kv) {
        auto& p = kv ? in.phi.v : in.phi.k;
        const std::string s = kv ? "_v" : "_k";
        p.pe = load_param("pe" + s);
        if (lin) {
          p.w = load_param("w" + s);
          p.b = load_param("b" + s);
        } else {
          p.w1 = load_param("w1" + s);
          p.b1 = load_param("b1" + s);
          p.w2 = load_param("w2" + s);
          p.b2 = load_param("b2" + s);
        }
      }
    } else {
      const uint64_t seed = vm["seed"].as<uint64_t>();
      in.phi = ref::random_compress_params<double>(w.cfg, seed);
      for (const char* n : {"pe_k", "w_k", "b_k", "w1_k", "b1_k", "w2_k", "b2_k", "pe_v", "w_v", "b_v", "w1_v", "b1_v",
                            "w2_v", "b2_v"})
        files[n] = cat(n, " (drawn from --seed ", seed, ")");
    }
  }
  const auto namer = [files](const std::string& role) {
    const auto it = files.find(role);
    return it == files.end() ? role : it->second;
  };
  ref::check_inputs(w.cfg, in, vm["allow-nonfinite"].as<bool>(), namer);
  const auto cu = in.seqlens_or_single();
  for (size_t b = 0; b + 1 < cu.size(); ++b) w.seqlens.push_back(cu[b + 1] - cu[b]);
  return w;
}

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
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_)) throw InputError(cat(dir_, ": cannot create output folder (", ec.message(), ")"));
}

OutputDir::~OutputDir() {
  if (committed_) return;
  for (const auto& s : staged_) std::remove(s.first.c_str());
}

void OutputDir::add_text(const std::string& filename, const std::string& text) {
  const std::string final_path = (fs::path(dir_) / filename).string();
  const std::string tmp = (fs::path(dir_) / cat(".", filename, ".tmp-", ::getpid())).string();
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw InputError(cat(final_path, ": cannot create file"));
    staged_.push_back({tmp, final_path});
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    f.flush();
    if (!f) throw InputError(cat(final_path, ": write failed (disk full?)"));
  }
}

template <class T>
void OutputDir::add(const std::string& name, const Tensor<T>& t) {
  add_text(name + ".npy", npy_bytes(t));
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

double available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024.0;
  return 1e18;  // unknown: do not refuse
}

void require_memory(double bytes, const std::string& what) {
  const double have = available_memory_bytes();
  if (bytes > have)
    throw ResourceError(cat(what, " needs about ", static_cast<int64_t>(bytes / 1e6), " MB of memory, but only ",
                            static_cast<int64_t>(have / 1e6), " MB are available"));
}

}  // namespace nsa::cli
