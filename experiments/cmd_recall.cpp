// `nsa recall`: NSA's selected blocks against the exact-attention oracle, with other selectors
// scored on the same data (analysis/recall.hpp). Writes recall.csv, summary.json, per-position
// maps and config.json into --out.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "recall.hpp"

namespace nsa::cli {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int cmd_recall(const Args& args) {
  Command cmd("recall",
              "Selected-block recall: NSA's blocks against the oracle (the top-n blocks by exact full-attention\n"
              "mass, summed over the group's heads), with quest, meanpool, random and window selectors on the same\n"
              "data. Writes recall.csv (selector x bucket x group), summary.json, <selector>_{recall,mass,\n"
              "mass_with_window}.npy [T, Hkv] and config.json. Definitions: docs/analysis.md.");
  cmd.add(input_options());
  cmd.add(nsa_options());
  cmd.add(run_options());
  po::options_description o("Recall");
  o.add_options()("selectors", po::value<std::string>()->default_value("nsa,oracle,quest,meanpool,random,window"),
                  "selectors to score, comma-separated")(
      "buckets", po::value<int64_t>()->default_value(8), "position (depth) buckets, equal width over [0, T)")(
      "include-trivial", po::bool_switch(),
      "aggregate also positions with at most n valid blocks (every selector takes them all; metrics 1)")(
      "selector-seed", po::value<uint64_t>()->default_value(0), "seed of the random selector")(
      "save-selections", po::bool_switch(), "also write <selector>_idx.npy [T, Hkv, n] (ascending, -1 padding)")(
      "save-block-mass", po::bool_switch(), "also write block_mass.npy [T, Hkv, ceil(T/l')]: exact mass per block");
  cmd.add(o);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  require_cpu_device(vm, "recall");
  if (vm["precision"].as<std::string>() != "double")
    throw ConfigError(cat("precision = '", vm["precision"].as<std::string>(),
                          "': recall computes the NSA forward and exact attention in double only"));
  const std::string path_name = vm["path"].as<std::string>();
  if (path_name != "fast" && path_name != "oracle")
    throw ConfigError(cat("path = '", path_name, "' is not one of: fast, oracle"));
  const ref::Path path = path_name == "fast" ? ref::Path::Fast : ref::Path::Oracle;

  analysis::RecallOptions ropt;
  ropt.selectors.clear();
  for (const auto& s : parse_list<std::string>(vm["selectors"].as<std::string>(), "selectors"))
    ropt.selectors.push_back(analysis::parse_selector(s));
  ropt.buckets = vm["buckets"].as<int64_t>();
  ropt.include_trivial = vm["include-trivial"].as<bool>();
  ropt.seed = vm["selector-seed"].as<uint64_t>();
  ropt.keep_selections = vm["save-selections"].as<bool>();
  ropt.keep_block_mass = vm["save-block-mass"].as<bool>();
  if (ropt.buckets < 1) throw ConfigError(cat("buckets = ", ropt.buckets, " is invalid: expected >= 1"));

  Workload w = load_workload(vm);
  const Config& c = w.cfg;
  int64_t NB = 0, Nc = 0;
  for (int64_t T : w.seqlens) NB = std::max(NB, c.num_slc_blocks(T)), Nc += c.num_cmp_blocks(T);
  const double N = double(w.in.N());
  const double fwd_bytes = (N * c.Hq * (4.0 * c.dv + 6) + N * c.Hkv * (double(NB) + c.slc_count) +
                            double(Nc) * c.Hkv * (c.dk + c.dv)) * 8 + 128e6;
  require_memory(fwd_bytes + analysis::recall_bytes(c, w.seqlens, ropt), "recall (the NSA forward and the maps)");
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());

  const auto t0 = std::chrono::steady_clock::now();
  ref::ForwardResult<double> fwd;
  const bool need_nsa =
      std::find(ropt.selectors.begin(), ropt.selectors.end(), analysis::Selector::Nsa) != ropt.selectors.end();
  if (need_nsa) fwd = ref::forward(c, w.in, path);
  const double fwd_secs = seconds_since(t0);
  const auto t1 = std::chrono::steady_clock::now();
  const analysis::RecallResult r = analysis::recall(c, w.in, fwd, ropt);
  const double recall_secs = seconds_since(t1);

  std::ostringstream csv;
  csv << "selector,bucket,t_lo,t_hi,group,positions,recall,mass,mass_with_window\n";
  for (const auto& row : r.rows)
    csv << analysis::to_string(row.selector) << "," << (row.bucket < 0 ? std::string("all") : std::to_string(row.bucket))
        << "," << row.t_lo << "," << row.t_hi << "," << (row.group < 0 ? std::string("all") : std::to_string(row.group))
        << "," << row.stats.positions << "," << csv_num(row.stats.recall) << "," << csv_num(row.stats.mass) << ","
        << csv_num(row.stats.mass_with_window) << "\n";
  json summary = json::object();
  for (analysis::Selector s : ropt.selectors) {
    const auto st = r.overall(s);
    summary[analysis::to_string(s)] = {{"recall", json_num(st.recall)},
                                      {"mass", json_num(st.mass)},
                                      {"mass_with_window", json_num(st.mass_with_window)},
                                      {"positions", st.positions}};
  }
  for (const auto& m : r.maps) {
    const std::string name = analysis::to_string(m.selector);
    out.add(name + "_recall", unpack(m.recall, w.batch));
    out.add(name + "_mass", unpack(m.mass, w.batch));
    out.add(name + "_mass_with_window", unpack(m.mass_with_window, w.batch));
    if (ropt.keep_selections) out.add(name + "_idx", unpack(m.idx, w.batch));
  }
  if (ropt.keep_block_mass) out.add("block_mass", unpack(r.block_mass, w.batch));
  out.add_text("recall.csv", csv.str());
  out.add_text("summary.json", summary.dump(2) + "\n");
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(c);
  j["workload"] = {{"N", w.in.N()}, {"batch", w.batch}, {"seqlens", w.seqlens}, {"shared_kv", w.in.all_shared()}};
  j["bucket_width"] = r.bucket_width;
  j["aggregated_positions"] = ropt.include_trivial ? "all" : "nontrivial (more than n valid blocks)";
  j["seconds"] = {{"forward", fwd_secs}, {"recall", recall_secs}};
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();

  std::cout << "recall: " << w.in.N() << " tokens, Hq=" << c.Hq << " Hkv=" << c.Hkv << " l=" << c.cmp_len
            << " d=" << c.cmp_stride << " l'=" << c.slc_len << " n=" << c.slc_count << " w=" << c.window
            << "; forward " << std::fixed << std::setprecision(1) << fwd_secs << " s, recall " << recall_secs << " s\n";
  std::cout << "  selector    recall    mass  mass+win  (" << (ropt.include_trivial ? "all" : "nontrivial")
            << " positions)\n";
  for (analysis::Selector s : ropt.selectors) {
    const auto st = r.overall(s);
    std::cout << "  " << std::left << std::setw(9) << analysis::to_string(s) << std::right << std::setprecision(4)
              << std::setw(9) << st.recall << std::setw(8) << st.mass << std::setw(10) << st.mass_with_window << "\n";
  }
  std::cout << std::defaultfloat << "recall: wrote " << out.dir() << "/recall.csv, summary.json and maps\n";
  return 0;
}

}  // namespace nsa::cli
