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
#include "stages.hpp"

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
      "CPU path: fast (Eigen/OpenMP) or oracle (plain loops, slow)");
  o.add(variant_options());
  return o;
}

po::options_description variant_options() {
  po::options_description o("CUDA kernels (docs/cuda.md, \"Kernel choice\")");
  o.add_options()("variant", po::value<std::string>()->default_value("auto"),
                  "kernel variant per stage: auto, fp32 or mma for every stage, or STAGE=VARIANT,... with the stages "
                  "phi, cmp_attn, topn, slc_attn, win_attn, combine (e.g. slc_attn=fp32)")(
      "warps", po::value<std::string>()->default_value(""),
      "warps per CTA of a stage's mma kernel, STAGE=N,... (0: chosen; cmp_attn, topn, win_attn up to 8, slc_attn 2)");
  return o;
}

po::options_description bwd_variant_options() {
  po::options_description o("CUDA backward kernels");
  o.add_options()("bwd-variant", po::value<std::string>()->default_value("auto"),
                  "the backward stages' variant: auto, fp32 (CUDA cores) or mma (tensor cores)");
  return o;
}

po::options_description decode_kernel_options() {
  po::options_description o("CUDA decode step (docs/cuda_decode.md)");
  o.add_options()("dec-kernel", po::value<int>()->default_value(-1),
                  "the step's split kernel: 1 general, 2 strided copies and unmasked tiles, 3 = 2 with 16-key tiles "
                  "(-1: the default)")(
      "dec-waves", po::value<int>()->default_value(1), "waves of split CTAs per launch the step aims at")(
      "dec-pdl", po::value<bool>()->default_value(true),
      "programmatic dependent launch between the step's kernels (sm_90 and newer)")(
      "dec-evict-first", po::value<bool>()->default_value(true), "stream the cache's K/V with L2 evict_first");
  return o;
}

po::options_description output_options() {
  po::options_description o("Output");
  o.add_options()("out", po::value<std::string>(), "output folder (created if missing)");
  return o;
}

void check_cuda_options(const po::variables_map& vm) {
  cuda::StageVariants variants{};
  cuda::StageWarps warps{};
  if (vm.count("variant")) cuda::parse_variants(vm["variant"].as<std::string>(), variants);
  if (vm.count("warps")) cuda::parse_warps(vm["warps"].as<std::string>(), warps);
  if (vm.count("bwd-variant")) {
    const cuda::Variant b = cuda::parse_variant(vm["bwd-variant"].as<std::string>());
    if (b == cuda::Variant::Cublas) throw ConfigError("bwd-variant = 'cublas' is not one of: auto, fp32, mma");
  }
  if (vm.count("dec-kernel")) {
    const int k = vm["dec-kernel"].as<int>();
    if (k != -1 && (k < 1 || k > 3)) throw ConfigError(cat("dec-kernel = ", k, " is invalid: expected 1, 2, 3 or -1 (the default)"));
  }
  if (vm.count("dec-waves") && vm["dec-waves"].as<int>() < 1)
    throw ConfigError(cat("dec-waves = ", vm["dec-waves"].as<int>(), " is invalid: expected >= 1"));
}

#ifdef NSA_WITH_CUDA
cuda::Options cuda_options(const po::variables_map& vm) {
  check_cuda_options(vm);
  cuda::Options opt;
  if (vm.count("dtype")) opt.dtype = cuda::parse_precision(vm["dtype"].as<std::string>());
  if (vm.count("variant")) cuda::parse_variants(vm["variant"].as<std::string>(), opt);
  if (vm.count("warps")) cuda::parse_warps(vm["warps"].as<std::string>(), opt);
  if (vm.count("bwd-variant")) opt.bwd_variant = cuda::parse_variant(vm["bwd-variant"].as<std::string>());
  if (vm.count("dec-kernel")) opt.decode_kernel = vm["dec-kernel"].as<int>();
  if (vm.count("dec-waves")) opt.dec_waves = vm["dec-waves"].as<int>();
  if (vm.count("dec-pdl")) opt.dec_pdl = vm["dec-pdl"].as<bool>();
  if (vm.count("dec-evict-first")) opt.dec_evict_first = vm["dec-evict-first"].as<bool>();
  return opt;
}

json kernels_json(const cuda::KernelChoice& k) {
  json j = json::object();
  auto one = [](const cuda::StageChoice& c) {
    json s{{"variant", cuda::to_string(c.variant)}, {"why", c.why}};
    if (c.warps > 0) s["warps"] = c.warps;
    if (c.fused_into >= 0) s["fused_into"] = cuda::to_string(cuda::Stage(c.fused_into));
    return s;
  };
  for (int i = 0; i < cuda::kStages; ++i) j[cuda::to_string(cuda::Stage(i))] = one(k.stage[size_t(i)]);
  if (k.backward.variant != cuda::Variant::Auto) j["backward"] = one(k.backward);
  return j;
}
#endif

int apply_run_options(const po::variables_map& vm) {
  const int threads = vm["threads"].as<int>();
  // More threads than this only oversubscribe the cores (and each holds its own working memory).
  if (threads < 0 || threads > 1024)
    throw ConfigError(cat("threads = ", threads, " is invalid: expected 0 (all cores) to 1024"));
  const std::string dtype = vm.count("dtype") ? vm["dtype"].as<std::string>() : "bf16";
  if (dtype != "bf16" && dtype != "fp16" && dtype != "fp32")
    throw ConfigError(cat("dtype = '", dtype, "' is not one of: bf16, fp16, fp32"));
  check_cuda_options(vm);
  return ref::set_threads(threads);
}

// ---- Config -----------------------------------------------------------------------------------

Activation activation_option(const po::variables_map& vm, const char* opt) {
  try {
    return parse_activation(vm[opt].as<std::string>());
  } catch (const ConfigError& e) {
    throw ConfigError(cat("--", opt, ": ", e.what()));
  }
}

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

}  // namespace nsa::cli
