// `nsa gen`: writes a synthetic workload's tensors as .npy files into --out.
#include <iostream>

#include "cli.hpp"
#include "commands.hpp"
#include "workloads.hpp"

namespace nsa::cli {

int cmd_gen(const Args& args) {
  Command cmd("gen",
              "Generate a synthetic workload: q.npy, k.npy, v.npy (and per-branch k/v, gates, do) in --out.\n"
              "Feed them to the other subcommands with --q DIR/q.npy --k DIR/k.npy --v DIR/v.npy.");
  po::options_description o("Workload");
  o.add_options()("workload", po::value<std::string>()->default_value("random"), "random: N(0, 1) entries")(
      "T", po::value<int64_t>()->default_value(1024), "tokens per sequence")(
      "B", po::value<int64_t>()->default_value(0), "batch size; 0 writes one sequence [T, H, D]")(
      "Hq", po::value<int64_t>()->default_value(16), "query heads")(
      "Hkv", po::value<int64_t>()->default_value(1), "key/value heads")(
      "dk", po::value<int64_t>()->default_value(64), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(64), "value head dim")(
      "seed", po::value<uint64_t>()->default_value(0), "random seed")(
      "separate-kv", po::bool_switch(), "also write independent k/v per branch (k_cmp.npy, v_cmp.npy, ...)")(
      "gates", po::value<std::string>()->default_value("none"),
      "none; random: gates.npy uniform in [0, 1]; mlp / linear: the gate MLP's gate_x, gate_w, gate_b (mlp: and "
      "gate_w0, gate_b0)")(
      "do", po::bool_switch(), "also write do.npy [T, Hq, dv], N(0, 1): dL/do for `nsa backward --do`")(
      "dtype", po::value<std::string>()->default_value("float32"), "file dtype: float32 or float64");
  cmd.add(o);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  GenSpec s;
  s.workload = vm["workload"].as<std::string>();
  s.T = vm["T"].as<int64_t>(), s.B = vm["B"].as<int64_t>();
  s.Hq = vm["Hq"].as<int64_t>(), s.Hkv = vm["Hkv"].as<int64_t>();
  s.dk = vm["dk"].as<int64_t>(), s.dv = vm["dv"].as<int64_t>();
  s.seed = vm["seed"].as<uint64_t>();
  s.separate_kv = vm["separate-kv"].as<bool>();
  s.gates = vm["gates"].as<std::string>();
  s.grad = vm["do"].as<bool>();
  const std::string dtype = vm["dtype"].as<std::string>();
  if (dtype != "float32" && dtype != "float64") throw ConfigError(cat("dtype = '", dtype, "' is not one of: float32, float64"));
  const double bytes = double(std::max<int64_t>(s.B, 1)) * s.T * (s.Hq * s.dk + s.Hkv * (s.dk + s.dv) * (s.separate_kv ? 4 : 1)) * 8;
  require_memory(bytes * 2, "the workload");
  const auto tensors = generate(s);
  OutputDir out(vm["out"].as<std::string>());
  for (const auto& [name, t] : tensors) {
    if (dtype == "float32")
      out.add(name, t.cast<float>());
    else
      out.add(name, t);
  }
  json j = resolved_config(cmd, vm);
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "gen: " << s.workload << " workload, " << tensors.size() << " tensors (" << dtype << ") -> " << out.dir() << "\n";
  return 0;
}

}  // namespace nsa::cli
