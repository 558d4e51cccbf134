// `nsa locality`: how blockwise exact full attention is (analysis/locality.hpp). Writes
// locality_topk.csv, locality_autocorr.csv, locality_distance.csv, locality.json, config.json.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "locality.hpp"

namespace nsa::cli {

int cmd_locality(const Args& args) {
  Command cmd("locality",
              "Attention locality of exact full attention at sampled positions: the mass of the top-k blocks\n"
              "of size B against the top k*B single tokens, the logits' autocorrelation against key distance,\n"
              "and the mass against distance. Writes locality_{topk,autocorr,distance}.csv, locality.json.");
  po::options_description in("Inputs");
  in.add_options()("q", po::value<std::string>(), "queries [T, Hq, dk] or [B, T, Hq, dk]")(
      "k", po::value<std::string>(), "keys [T, Hkv, dk]")("v", po::value<std::string>(),
                                                          "values [T, Hkv, dv] (checked, not used)")(
      "cu-seqlens", po::value<std::string>(), "int [B+1] offsets of packed sequences")(
      "allow-nonfinite", po::bool_switch(), "let NaN/Inf inputs through");
  cmd.add(in);
  po::options_description o("Locality");
  o.add_options()("block-sizes", po::value<std::string>()->default_value("8,16,32,64,128"), "block sizes B")(
      "ks", po::value<std::string>()->default_value("1,2,4,8,16"), "numbers of blocks k")(
      "lags", po::value<std::string>()->default_value("1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256,384,512,768,1024"),
      "key distances of the autocorrelation")(
      "queries", po::value<int64_t>()->default_value(256),
      "query positions per sequence, evenly spaced, ending at T-1 (0: all)")(
      "scale", po::value<double>()->default_value(0.0), "softmax scale (0: 1/sqrt(dk))")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores); results do not depend on it");
  cmd.add(o);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  analysis::LocalityOptions lopt;
  lopt.block_sizes = parse_list<int64_t>(vm["block-sizes"].as<std::string>(), "block-sizes");
  lopt.ks = parse_list<int64_t>(vm["ks"].as<std::string>(), "ks");
  lopt.lags = parse_list<int64_t>(vm["lags"].as<std::string>(), "lags");
  lopt.queries = vm["queries"].as<int64_t>();
  Workload w = load_workload(vm, /*nsa=*/false);
  int64_t Tmax = 0;
  for (int64_t T : w.seqlens) Tmax = std::max(Tmax, T);
  ref::set_threads(vm["threads"].as<int>());
  require_memory(double(w.cfg.G()) * double(Tmax) * 8 * 3 * omp_get_max_threads(), "locality (score rows)");
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  const analysis::LocalityResult r = analysis::locality(w.cfg, w.in, lopt);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::ostringstream topk, ac, dist;
  topk << "block_size,k,tokens,rows,block_mass,token_mass,ratio\n";
  json jt = json::array(), ja = json::array(), jd = json::array();
  for (const auto& x : r.topk) {
    topk << x.block_size << "," << x.k << "," << x.tokens << "," << x.rows << "," << csv_num(x.block_mass) << ","
         << csv_num(x.token_mass) << "," << csv_num(x.ratio) << "\n";
    jt.push_back({{"block_size", x.block_size}, {"k", x.k}, {"tokens", x.tokens}, {"rows", x.rows},
                  {"block_mass", json_num(x.block_mass)}, {"token_mass", json_num(x.token_mass)},
                  {"ratio", json_num(x.ratio)}});
  }
  ac << "lag,rows,autocorr\n";
  for (const auto& x : r.autocorr) {
    ac << x.lag << "," << x.rows << "," << csv_num(x.autocorr) << "\n";
    ja.push_back({{"lag", x.lag}, {"rows", x.rows}, {"autocorr", json_num(x.autocorr)}});
  }
  dist << "distance_lo,distance_hi,mass,mass_per_token\n";
  for (const auto& x : r.distance) {
    dist << x.lo << "," << x.hi << "," << csv_num(x.mass) << "," << csv_num(x.mass_per_token) << "\n";
    jd.push_back({{"distance_lo", x.lo}, {"distance_hi", x.hi}, {"mass", json_num(x.mass)},
                  {"mass_per_token", json_num(x.mass_per_token)}});
  }
  const json j{{"rows", r.rows}, {"positions", r.positions}, {"topk", jt}, {"autocorr", ja}, {"distance", jd}};
  out.add_text("locality_topk.csv", topk.str());
  out.add_text("locality_autocorr.csv", ac.str());
  out.add_text("locality_distance.csv", dist.str());
  out.add_text("locality.json", j.dump(2) + "\n");
  json cfgj = resolved_config(cmd, vm);
  cfgj["config"] = {{"Hq", w.cfg.Hq}, {"Hkv", w.cfg.Hkv}, {"dk", w.cfg.dk}, {"dv", w.cfg.dv}, {"scale", w.cfg.softmax_scale()}};
  cfgj["workload"] = {{"N", w.in.N()}, {"batch", w.batch}, {"seqlens", w.seqlens}};
  cfgj["seconds"] = secs;
  out.add_text("config.json", cfgj.dump(2) + "\n");
  out.commit();

  std::cout << "locality: " << r.rows << " (position, head) rows, " << std::fixed << std::setprecision(1) << secs
            << " s\n  top-k blocks / top-k*B tokens (mass ratio):\n";
  for (const auto& x : r.topk)
    std::cout << "    B=" << std::setw(4) << x.block_size << " k=" << std::setw(3) << x.k << "  " << std::setprecision(4)
              << x.block_mass << " / " << x.token_mass << " = " << x.ratio << "  (" << x.rows << " rows)\n";
  std::cout << std::defaultfloat << "locality: wrote " << out.dir() << "/locality_*.csv and locality.json\n";
  return 0;
}

}  // namespace nsa::cli
