// `nsa traffic`: the analytic memory-traffic and roofline model (analysis/traffic.hpp) for decode
// and prefill, full attention against NSA. Writes decode.csv / prefill.csv (the paper's table
// columns), traffic.csv (every branch and loading variant), traffic.json and config.json.
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "traffic.hpp"

namespace nsa::cli {

namespace {

int dtype_bytes(const std::string& d) {
  if (d == "bf16" || d == "fp16") return 2;
  if (d == "fp32") return 4;
  throw ConfigError(cat("dtype = '", d, "' is not one of: bf16, fp16, fp32"));
}

const char* kBranchNames[] = {"phi", "cmp", "slc", "win", "nsa", "full"};

std::vector<analysis::BranchTraffic> branches(const analysis::Traffic& t) {
  return {t.phi, t.cmp, t.slc, t.win, t.nsa(), t.full};
}

}  // namespace

int cmd_traffic(const Args& args) {
  Command cmd("traffic",
              "Analytic memory traffic of NSA against full attention: tokens, bytes and FLOPs per branch for a\n"
              "decode step and a prefill pass, group-centric and per-head K/V loading, arithmetic intensity and\n"
              "roofline times on a device. Writes decode.csv and prefill.csv (context, full_tokens, nsa_tokens,\n"
              "expected_speedup), traffic.csv (per branch), traffic.json. Definitions: docs/analysis.md.");
  po::options_description o("Traffic model");
  o.add_options()("decode", po::bool_switch(), "model decode steps (default: decode and prefill)")(
      "prefill", po::bool_switch(), "model prefill passes (default: decode and prefill)")(
      "context", po::value<std::string>()->default_value("8192,16384,32768,65536"),
      "cache lengths s (decode) and sequence lengths T (prefill), comma-separated")(
      "batch", po::value<int64_t>()->default_value(1), "sequences")(
      "Hq", po::value<int64_t>()->default_value(64), "query heads (paper: 64)")(
      "Hkv", po::value<int64_t>()->default_value(4), "key/value heads (paper: 4)")(
      "dk", po::value<int64_t>()->default_value(192), "query/key head dim (paper: 192)")(
      "dv", po::value<int64_t>()->default_value(128), "value head dim (paper: 128)")(
      "dtype", po::value<std::string>()->default_value("bf16"), "K/V/q/o element type: bf16, fp16, fp32")(
      "convention", po::value<std::string>()->default_value("exact"),
      "decode token count: paper (floor(s/d) + n*l' + w, the paper's table) or exact (what our kernels read)")(
      "loading", po::value<std::string>()->default_value("both"), "K/V loading variants: group, head or both")(
      "q-tile", po::value<int64_t>()->default_value(64), "prefill query positions per tile")(
      "gpu", po::value<std::string>()->default_value("h100"), "device preset: h100, a100, h100-measured")(
      "peak-tflops", po::value<double>(), "measured peak TFLOP/s (overrides the preset's)")(
      "bandwidth-tbs", po::value<double>(), "measured bandwidth TB/s (overrides the preset's)");
  cmd.add(o);
  cmd.add(nsa_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  Config c = block_config(vm);
  c.Hq = vm["Hq"].as<int64_t>(), c.Hkv = vm["Hkv"].as<int64_t>();
  c.dk = vm["dk"].as<int64_t>(), c.dv = vm["dv"].as<int64_t>();
  c.validate();
  bool do_decode = vm["decode"].as<bool>(), do_prefill = vm["prefill"].as<bool>();
  if (!do_decode && !do_prefill) do_decode = do_prefill = true;
  const auto contexts = parse_list<int64_t>(vm["context"].as<std::string>(), "context");
  const int64_t batch = vm["batch"].as<int64_t>();
  const std::string dtype = vm["dtype"].as<std::string>();
  const int bytes = dtype_bytes(dtype);
  const analysis::Convention conv = analysis::parse_convention(vm["convention"].as<std::string>());
  const std::string loading = vm["loading"].as<std::string>();
  std::vector<analysis::Loading> loadings;
  if (loading == "both")
    loadings = {analysis::Loading::GroupCentric, analysis::Loading::PerHead};
  else
    loadings = {analysis::parse_loading(loading)};
  analysis::Device dev = analysis::device_preset(vm["gpu"].as<std::string>());
  if (vm.count("peak-tflops")) dev.flops_per_s = vm["peak-tflops"].as<double>() * 1e12, dev.name += "+measured-peak";
  if (vm.count("bandwidth-tbs")) dev.bytes_per_s = vm["bandwidth-tbs"].as<double>() * 1e12, dev.name += "+measured-bw";
  if (!(dev.flops_per_s > 0) || !(dev.bytes_per_s > 0))
    throw ConfigError(cat("peak-tflops and bandwidth-tbs must be > 0 (got ", dev.flops_per_s / 1e12, ", ",
                          dev.bytes_per_s / 1e12, ")"));
  const int64_t q_tile = vm["q-tile"].as<int64_t>();

  OutputDir out(vm["out"].as<std::string>());
  std::ostringstream detail;
  detail << "phase,convention,loading,context,batch,branch,tokens,bytes,flops,intensity,roofline_ms\n";
  json jphase = json::object();
  auto run_phase = [&](const char* phase, bool decode) {
    std::ostringstream table;
    table << "context,full_tokens,nsa_tokens,expected_speedup\n";
    json rows = json::array();
    const char* conv_name = decode ? analysis::to_string(conv) : "exact";
    std::cout << phase << " (" << conv_name << " count, " << dtype << ", batch " << batch << ", " << dev.name << ": "
              << dev.flops_per_s / 1e12 << " TFLOP/s, " << dev.bytes_per_s / 1e12 << " TB/s)\n"
              << "  context  loading  full_tokens   nsa_tokens  expected  full_ms   nsa_ms  predicted  nsa FLOP/B\n";
    for (int64_t s : contexts) {
      for (analysis::Loading ld : loadings) {
        analysis::TrafficOptions topt;
        topt.loading = ld;
        topt.q_tile = q_tile;
        const analysis::Traffic t = decode ? analysis::decode_traffic(c, s, batch, bytes, conv, topt)
                                           : analysis::prefill_traffic(c, s, batch, bytes, topt);
        const auto br = branches(t);
        json jb = json::object();
        for (size_t i = 0; i < br.size(); ++i) {
          const double ms = br[i].flops > 0 || br[i].bytes > 0 ? analysis::roofline_ms(br[i].flops, br[i].bytes, dev) : 0;
          detail << phase << "," << conv_name << "," << analysis::to_string(ld) << "," << s << "," << batch << ","
                 << kBranchNames[i] << "," << csv_num(br[i].tokens) << "," << csv_num(br[i].bytes) << ","
                 << csv_num(br[i].flops) << "," << csv_num(br[i].intensity()) << "," << csv_num(ms) << "\n";
          jb[kBranchNames[i]] = {{"tokens", br[i].tokens}, {"bytes", br[i].bytes}, {"flops", br[i].flops},
                                 {"intensity", br[i].intensity()}, {"roofline_ms", ms}};
        }
        // nsa_ms sums the branches' roofline times (separate kernels); the "nsa" row above is
        // the roofline of the summed traffic, a fused-kernel bound.
        const double full_ms = t.full_ms(dev), nsa_ms = t.nsa_ms(dev);
        const analysis::BranchTraffic nsa = t.nsa();
        if (ld == analysis::Loading::GroupCentric || loadings.size() == 1)
          table << s << "," << csv_num(t.full.tokens) << "," << csv_num(nsa.tokens) << ","
                << csv_num(t.expected_speedup()) << "\n";
        rows.push_back({{"context", s},
                        {"loading", analysis::to_string(ld)},
                        {"full_tokens", t.full.tokens},
                        {"nsa_tokens", nsa.tokens},
                        {"expected_speedup", t.expected_speedup()},
                        {"byte_speedup", t.full.bytes / nsa.bytes},
                        {"predicted_full_ms", full_ms},
                        {"predicted_nsa_ms", nsa_ms},
                        {"predicted_speedup", full_ms / nsa_ms},
                        {"branches", jb}});
        std::cout << std::setw(9) << s << std::setw(9) << analysis::to_string(ld) << std::setw(13)
                  << std::setprecision(6) << t.full.tokens << std::setw(13) << nsa.tokens << std::fixed
                  << std::setprecision(2) << std::setw(9) << t.expected_speedup() << "x" << std::setprecision(3)
                  << std::setw(9) << full_ms << std::setw(9) << nsa_ms << std::setprecision(2) << std::setw(10)
                  << full_ms / nsa_ms << "x" << std::setprecision(1) << std::setw(11) << nsa.intensity() << "\n"
                  << std::defaultfloat << std::setprecision(6);
      }
    }
    out.add_text(std::string(phase) + ".csv", table.str());
    jphase[phase] = {{"convention", conv_name}, {"rows", rows}};
  };
  if (do_decode) run_phase("decode", true);
  if (do_prefill) run_phase("prefill", false);
  out.add_text("traffic.csv", detail.str());
  json j = jphase;
  j["device"] = {{"name", dev.name}, {"flops_per_s", dev.flops_per_s}, {"bytes_per_s", dev.bytes_per_s}};
  j["dtype"] = dtype;
  j["batch"] = batch;
  j["config"] = config_json(c);
  out.add_text("traffic.json", j.dump(2) + "\n");
  json cfgj = resolved_config(cmd, vm);
  cfgj["config"] = config_json(c);
  out.add_text("config.json", cfgj.dump(2) + "\n");
  out.commit();
  std::cout << "traffic: wrote " << out.dir() << "/{decode,prefill}.csv, traffic.csv, traffic.json\n";
  return 0;
}

}  // namespace nsa::cli
