// `nsa forward` and `nsa full`: the NSA forward pass and full causal attention on a workload.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>

#include "cli.hpp"
#include "commands.hpp"
#ifdef NSA_WITH_CUDA
#include "nsa_cuda.hpp"
#endif

namespace nsa::cli {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The memory of a run of forward or full: the inputs in float too (for --precision float), the
// result and working memory of the reference (ref::forward_memory), and the one copy of the
// largest output made while the files are written (unpack).
MemoryPlan run_plan(bool dbl, int threads, ref::Path path, bool nsa) {
  return [=](const WorkloadSizes& z, MemoryBudget& b) {
    const int elem = dbl ? 8 : 4;
    if (!dbl) b.add("inputs in float", z.input_bytes / 2);
    const ref::MemoryUse m = nsa ? ref::forward_memory(z.cfg, z.seqlens, z.gate_hidden, elem, threads, path)
                                 : ref::full_attention_memory(z.cfg, z.seqlens, elem, threads, path);
    b.add("outputs", m.result);
    b.add(cat("working memory (", threads, " threads)"), m.working);
    int64_t NB = 0;
    for (int64_t T : z.seqlens) NB = std::max(NB, z.cfg.num_slc_blocks(T));
    const double heads_dv = double(z.cfg.Hq) * double(z.cfg.dv);
    const double widest = nsa ? std::max(heads_dv, double(z.cfg.Hkv) * double(NB)) : heads_dv;
    b.add("writing", double(elem) * double(z.N) * widest);
  };
}

// A NaN or Inf in an output although every input was finite: the arithmetic overflowed (logits
// or sums beyond the range of the precision). Refused rather than written, naming the first.
// lse = -inf is an empty branch (docs/spec.md 3), not an overflow.
template <class S>
void check_finite_outputs(const std::vector<std::pair<std::string, const Tensor<S>*>>& outputs, int64_t batch,
                          bool dbl) {
  for (const auto& [name, t] : outputs) {
    const bool lse = name.rfind("lse", 0) == 0;
    for (int64_t i = 0; i < t->numel(); ++i) {
      const S x = (*t)[i];
      if (std::isfinite(x) || (lse && x == -std::numeric_limits<S>::infinity())) continue;
      Shape shape = t->shape();  // as written: [B, T, ...] for a batch
      if (batch > 0) shape.insert(shape.begin(), batch), shape[1] /= batch;
      throw Error(cat(name, " at index ", index_str(shape, i), " is ", value_str(double(x)),
                      " although every input is finite: the ", dbl ? "double" : "float",
                      " arithmetic overflowed (inputs too large", dbl ? "" : "; try --precision double",
                      "); nothing was written (--allow-nonfinite writes it)"));
    }
  }
}


}  // namespace

template <class S>
void write_forward(const Workload& w, const ref::ForwardResult<S>& r, OutputDir& out) {
  const int64_t B = w.batch;
  out.add("o", unpack(r.o, B));
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    out.add("o_" + b, unpack(r.o_branch[c], B));
    out.add("lse_" + b, unpack(r.lse[c], B));
  }
  out.add("gates", unpack(r.gates, B));
  out.add("block_idx", unpack(r.block_idx, B));
  out.add("block_scores", unpack(r.block_scores, B));
  out.add("k_cmp_compressed", unpack(r.k_cmp_compressed, B));
  out.add("v_cmp_compressed", unpack(r.v_cmp_compressed, B));
  if (B == 0 && w.seqlens.size() > 1)  // packed: where each sequence's compressed rows start
    out.add("cu_seqlens_cmp", Tensor<int64_t>({int64_t(r.cu_cmp.size())}, r.cu_cmp));
}

template void write_forward<double>(const Workload&, const ref::ForwardResult<double>&, OutputDir&);
template void write_forward<float>(const Workload&, const ref::ForwardResult<float>&, OutputDir&);

template <class S>
void check_finite_outputs(const ref::ForwardResult<S>& r, int64_t batch, bool dbl) {
  check_finite_outputs<S>({{"o", &r.o}, {"o_cmp", &r.o_branch[0]}, {"o_slc", &r.o_branch[1]}, {"o_win", &r.o_branch[2]},
                           {"lse_cmp", &r.lse[0]}, {"lse_slc", &r.lse[1]}, {"lse_win", &r.lse[2]},
                           {"block_scores", &r.block_scores}, {"k_cmp_compressed", &r.k_cmp_compressed},
                           {"v_cmp_compressed", &r.v_cmp_compressed}},
                          batch, dbl);
}
template void check_finite_outputs(const ref::ForwardResult<double>&, int64_t, bool);
template void check_finite_outputs(const ref::ForwardResult<float>&, int64_t, bool);

void require_cpu_device(const po::variables_map& vm, const char* cmd) {
  const std::string d = vm["device"].as<std::string>();
  if (d == "cpu") return;
  if (d == "cuda")
    throw ConfigError(cat("device = cuda: `nsa ", cmd, "` runs on the CPU only"));
  throw ConfigError(cat("device = '", d, "' is not one of: cpu, cuda"));
}

bool use_cuda_device(const po::variables_map& vm, const char* cmd) {
  const std::string d = vm["device"].as<std::string>();
  if (d == "cpu") return false;
  if (d != "cuda") throw ConfigError(cat("device = '", d, "' is not one of: cpu, cuda"));
#ifdef NSA_WITH_CUDA
  std::string why;
  if (!cuda::available(&why)) throw CudaError(cat("device = cuda: ", why));
  return true;
#else
  throw ConfigError(cat("device = cuda: `nsa ", cmd,
                        "` was built without the CUDA path (it is built only where nvcc is found, see README 'CUDA')"));
#endif
}

int cmd_forward(const std::vector<std::string>& args) {
  Command cmd("forward", "NSA forward pass (docs/spec.md 1-5): every output and intermediate, as .npy files in --out.");
  cmd.add(input_options());
  cmd.add(nsa_options());
  cmd.add(run_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const bool on_cuda = use_cuda_device(vm, "forward");
  const bool dbl = !on_cuda && use_double(vm);
  const ref::Path path = parse_path(vm);
  const int threads = apply_run_options(vm);
  const bool allow_nonfinite = vm["allow-nonfinite"].as<bool>();
  Workload w = load_workload(vm, /*nsa=*/true, run_plan(dbl, threads, path, /*nsa=*/true));
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  std::string arith = dbl ? "double" : "float";
  json device_json;
  auto finish = [&](const auto& r) {
    if (!allow_nonfinite) check_finite_outputs(r, w.batch, dbl);
    write_forward(w, r, out);
  };
  if (on_cuda) {
#ifdef NSA_WITH_CUDA
    // The device rounds the inputs to --dtype and returns every output as float32.
    const cuda::Options opt = cuda_options(vm);
    cuda::Plan plan(w.cfg, w.in.N(), w.in.cu_seqlens, opt);
    plan.upload(w.in.cast<float>());
    plan.run();
    finish(plan.download());
    arith = cat("cuda ", cuda::to_string(opt.dtype), " ", plan.kernels().summary());
    device_json = {{"name", cuda::device_name()}, {"dtype", cuda::to_string(opt.dtype)},
                   {"kernels", kernels_json(plan.kernels())}};
#endif
  } else if (dbl) {
    finish(ref::forward(w.cfg, w.in, path));
  } else {
    finish(ref::forward(w.cfg, w.in.cast<float>(), path));
  }
  const double secs = seconds_since(t0);
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(w.cfg);
  j["workload"] = workload_json(w);
  j["seconds"] = secs;
  j["memory"] = memory_report(w);
  if (on_cuda) j["cuda"] = device_json;
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "forward: " << w.in.N() << " tokens in " << w.seqlens.size() << " sequence(s), Hq=" << w.cfg.Hq
            << " Hkv=" << w.cfg.Hkv << " dk=" << w.cfg.dk << " dv=" << w.cfg.dv << ", " << arith << ", " << secs
            << " s -> " << out.dir() << "\n";
  return 0;
}

int cmd_full(const std::vector<std::string>& args) {
  Command cmd("full", "Full causal softmax attention with the same GQA layout (docs/spec.md 6): o and lse.");
  po::options_description in("Inputs");
  in.add_options()("q", po::value<std::string>(), "queries [T, Hq, dk] or [B, T, Hq, dk]")(
      "k", po::value<std::string>(), "keys [T, Hkv, dk]")("v", po::value<std::string>(), "values [T, Hkv, dv]")(
      "cu-seqlens", po::value<std::string>(), "int [B+1] offsets of packed sequences")(
      "allow-nonfinite", po::bool_switch(), "let NaN/Inf inputs through");
  cmd.add(in);
  po::options_description s("Attention");
  s.add_options()("scale", po::value<double>()->default_value(0.0), "softmax scale (0: 1/sqrt(dk))");
  cmd.add(s);
  cmd.add(run_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  require_cpu_device(vm, "full");
  const bool dbl = use_double(vm);
  const ref::Path path = parse_path(vm);
  const int threads = apply_run_options(vm);
  const bool allow_nonfinite = vm["allow-nonfinite"].as<bool>();
  Workload w = load_workload(vm, /*nsa=*/false, run_plan(dbl, threads, path, /*nsa=*/false));
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  auto run = [&](const auto& in) {
    const auto r = ref::full_attention(w.cfg, in.q, in.k, in.v, in.cu_seqlens, path);
    using S = typename std::decay_t<decltype(r.o)>::value_type;
    if (!allow_nonfinite) check_finite_outputs<S>({{"o", &r.o}, {"lse", &r.lse}}, w.batch, dbl);
    out.add("o", unpack(r.o, w.batch));
    out.add("lse", unpack(r.lse, w.batch));
  };
  if (dbl)
    run(w.in);
  else
    run(w.in.cast<float>());
  const double secs = seconds_since(t0);
  json j = resolved_config(cmd, vm);
  j["config"] = {{"Hq", w.cfg.Hq}, {"Hkv", w.cfg.Hkv}, {"dk", w.cfg.dk}, {"dv", w.cfg.dv}, {"scale", w.cfg.softmax_scale()}};
  j["workload"] = workload_json(w);
  j["seconds"] = secs;
  j["memory"] = memory_report(w);
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "full: " << w.in.N() << " tokens, " << secs << " s -> " << out.dir() << "\n";
  return 0;
}

}  // namespace nsa::cli
