// `nsa forward` and `nsa full`: the NSA forward pass and full causal attention on a workload.
#include <chrono>
#include <iostream>

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

// Bytes the forward pass holds beyond its inputs: the outputs, and a score tile per thread.
double forward_bytes(const Workload& w, int elem) {
  const Config& c = w.cfg;
  const double N = double(w.in.N());
  int64_t NB = 0, Nc = 0;
  for (int64_t T : w.seqlens) NB = std::max(NB, c.num_slc_blocks(T)), Nc += c.num_cmp_blocks(T);
  const double out = N * c.Hq * (4.0 * c.dv + 3 + 3) + N * c.Hkv * (double(NB) + c.slc_count) +
                     double(Nc) * c.Hkv * (c.dk + c.dv);
  return out * elem + 64e6 * 2;
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
  Command cmd("forward", "NSA forward pass (NSA-SPEC.md 1-5): every output and intermediate, as .npy files in --out.");
  cmd.add(input_options());
  cmd.add(nsa_options());
  cmd.add(run_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const bool on_cuda = use_cuda_device(vm, "forward");
  const bool dbl = !on_cuda && use_double(vm);
  const ref::Path path = parse_path(vm);
  Workload w = load_workload(vm);
  require_memory(forward_bytes(w, dbl ? 8 : 4), "the forward pass");
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  std::string arith = dbl ? "double" : "float";
  json device_json;
  if (on_cuda) {
#ifdef NSA_WITH_CUDA
    // The device rounds the inputs to --dtype and returns every output as float32.
    cuda::Options opt;
    opt.dtype = cuda::parse_precision(vm["dtype"].as<std::string>());
    opt.kernel = vm["kernel"].as<int>();
    std::string why;
    const int version = cuda::choose_kernel(w.cfg, opt, &why);
    cuda::Plan plan(w.cfg, w.in.N(), w.in.cu_seqlens, opt);
    plan.upload(w.in.cast<float>());
    plan.run();
    write_forward(w, plan.download(), out);
    arith = cat("cuda ", cuda::to_string(opt.dtype), " kernel v", plan.kernel());
    device_json = {{"name", cuda::device_name()}, {"dtype", cuda::to_string(opt.dtype)}, {"kernel", plan.kernel()},
                   {"kernel_choice", plan.kernel() == version ? why : "v0: the shared memory of v1 does not fit"}};
#endif
  } else if (dbl) {
    write_forward(w, ref::forward(w.cfg, w.in, path), out);
  } else {
    const auto in = w.in.cast<float>();
    write_forward(w, ref::forward(w.cfg, in, path), out);
  }
  const double secs = seconds_since(t0);
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(w.cfg);
  j["workload"] = workload_json(w);
  j["seconds"] = secs;
  if (on_cuda) j["cuda"] = device_json;
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "forward: " << w.in.N() << " tokens in " << w.seqlens.size() << " sequence(s), Hq=" << w.cfg.Hq
            << " Hkv=" << w.cfg.Hkv << " dk=" << w.cfg.dk << " dv=" << w.cfg.dv << ", " << arith << ", " << secs
            << " s -> " << out.dir() << "\n";
  return 0;
}

int cmd_full(const std::vector<std::string>& args) {
  Command cmd("full", "Full causal softmax attention with the same GQA layout (NSA-SPEC.md 6): o and lse.");
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
  Workload w = load_workload(vm, /*nsa=*/false);
  const double N = double(w.in.N());
  require_memory(N * w.cfg.Hq * (w.cfg.dv + 1) * (dbl ? 8 : 4), "full attention");
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  auto run = [&](const auto& in) {
    const auto r = ref::full_attention(w.cfg, in.q, in.k, in.v, in.cu_seqlens, path);
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
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "full: " << w.in.N() << " tokens, " << secs << " s -> " << out.dir() << "\n";
  return 0;
}

}  // namespace nsa::cli
