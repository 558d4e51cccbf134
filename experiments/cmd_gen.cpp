// `nsa gen`: writes a synthetic workload's tensors as .npy files into --out.
#include <algorithm>
#include <iostream>

#include "cli.hpp"
#include "commands.hpp"
#include "workloads.hpp"

namespace nsa::cli {

namespace {

GenSpec gen_spec(const po::variables_map& vm) {
  GenSpec s;
  s.workload = vm["workload"].as<std::string>();
  s.T = vm["T"].as<int64_t>(), s.B = vm["B"].as<int64_t>();
  s.Hq = vm["Hq"].as<int64_t>(), s.Hkv = vm["Hkv"].as<int64_t>();
  s.dk = vm["dk"].as<int64_t>(), s.dv = vm["dv"].as<int64_t>();
  s.seed = vm["seed"].as<uint64_t>();
  s.separate_kv = vm["separate-kv"].as<bool>();
  s.gates = vm["gates"].as<std::string>();
  s.grad = vm["do"].as<bool>();
  s.depths = parse_list<double>(vm["depth"].as<std::string>(), "depth");
  s.needle_len = vm["needle-len"].as<int64_t>();
  s.needle_strength = vm["needle-strength"].as<double>();
  s.questions = vm["questions"].as<int64_t>();
  s.corr_len = vm["corr-len"].as<double>();
  s.cluster_strength = vm["cluster-strength"].as<double>();
  return s;
}

}  // namespace

int cmd_gen(const Args& args) {
  Command cmd("gen",
              "Generate a synthetic workload: q.npy, k.npy, v.npy (and per-branch k/v, gates, do, and what the\n"
              "workload plants) in --out. Feed them to the other subcommands with --q DIR/q.npy --k DIR/k.npy\n"
              "--v DIR/v.npy. Workloads (docs/experiments.md):\n"
              "  random     q, k, v ~ N(0, 1)\n"
              "  needle     needle in a haystack: one needle per --depth (one sequence each), questions at the\n"
              "             end aligned with it; also writes needle_pos.npy [S] (int64) and needle_value.npy\n"
              "  clustered  keys with a latent AR(1) component of correlation length --corr-len tokens");
  po::options_description o("Workload");
  o.add_options()("workload", po::value<std::string>()->default_value("random"), "random, needle or clustered")(
      "T", po::value<int64_t>()->default_value(1024), "tokens per sequence")(
      "B", po::value<int64_t>()->default_value(0), "batch size; 0 writes one sequence [T, H, D] (not for needle)")(
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
  po::options_description n("needle");
  n.add_options()("depth", po::value<std::string>()->default_value("0.5"),
                  "needle depths in [0, 1], comma-separated: one sequence each (several make a batch)")(
      "needle-len", po::value<int64_t>()->default_value(16), "tokens the needle spans")(
      "needle-strength", po::value<double>()->default_value(8.0),
      "the needle's logit margin for a question, in standard deviations of the haystack logits")(
      "questions", po::value<int64_t>()->default_value(16), "question queries: the last N tokens");
  po::options_description c("clustered");
  c.add_options()("corr-len", po::value<double>()->default_value(64.0),
                  "correlation length of the keys' latent process, tokens (0: independent)")(
      "cluster-strength", po::value<double>()->default_value(2.0), "std of the keys' latent part (the noise has std 1)");
  cmd.add(o);
  cmd.add(n);
  cmd.add(c);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const GenSpec s = gen_spec(vm);
  const std::string dtype = vm["dtype"].as<std::string>();
  if (dtype != "float32" && dtype != "float64") throw ConfigError(cat("dtype = '", dtype, "' is not one of: float32, float64"));
  validate(s);
  // Every tensor is drawn in double; for float32 files each is copied to float as it is written.
  const double tokens = double(s.sequences()) * double(s.T);
  const double Hq = double(s.Hq), Hkv = double(s.Hkv), dk = double(s.dk), dv = double(s.dv);
  const double per_token = Hq * dk + Hkv * (dk + dv) * (s.separate_kv ? 4 : 1) + (s.gates == "random" ? 3 * Hq : 0) +
                           (s.gates == "mlp" || s.gates == "linear" ? 16 : 0) + (s.grad ? Hq * dv : 0);
  MemoryBudget budget;
  budget.add("tensors in double", 8 * tokens * per_token);
  if (dtype == "float32") budget.add("writing", 4 * tokens * std::max(Hq * dk, std::max(Hq * dv, Hkv * std::max(dk, dv))));
  budget.require();
  const Generated g = generate(s);
  OutputDir out(vm["out"].as<std::string>());
  for (const auto& [name, t] : g) {
    if (dtype == "float32")
      out.add(name, t.cast<float>());
    else
      out.add(name, t);
  }
  json j = resolved_config(cmd, vm);
  if (s.workload == "needle") {
    const NeedleLayout lay = needle_layout(s);
    out.add("needle_pos", Tensor<int64_t>({int64_t(lay.start.size())}, lay.start));
    j["needle"] = {{"depths", s.depths}, {"start", lay.start}, {"len", lay.len}, {"first_question", lay.first_question}};
  }
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "gen: " << s.workload << " workload, " << s.sequences() << " sequence(s) of " << s.T << " tokens, "
            << g.size() + (s.workload == "needle") << " files (" << dtype << ") -> " << out.dir() << "\n";
  return 0;
}

}  // namespace nsa::cli
