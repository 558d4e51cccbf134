// `nsa bench`: NSA forward against full attention, timed in one run (STYLE 8): medians after
// warm-up, useful FLOPs (analysis/cost.hpp), the machine's measured matrix-product rate as the
// ceiling, and full attention measured in the same run as the baseline. Writes bench.json and
// bench.csv into --out; one line per case on stdout as each finishes.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

#include "ceiling.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "cost.hpp"
#include "rng.hpp"

namespace nsa::cli {

namespace {

// Median wall time of `reps` runs after `warmup` runs, in ms.
template <class F>
double median_ms(F&& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string today() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

template <class S>
ref::Inputs<S> random_inputs(const Config& c, int64_t T, uint64_t seed) {
  Rng rng(seed);
  ref::Inputs<S> in;
  auto normal = [&](Shape s) {
    Tensor<S> t(std::move(s));
    for (auto& v : t.vec()) v = static_cast<S>(rng.normal());
    return t;
  };
  in.q = normal({T, c.Hq, c.dk});
  in.k = normal({T, c.Hkv, c.dk});
  in.v = normal({T, c.Hkv, c.dv});
  in.phi = ref::random_compress_params<S>(c, seed + 1);
  return in;
}

struct BenchRun {
  json records = json::array();
  std::ostringstream csv;
  void add(const json& r) {
    records.push_back(r);
    csv << r["op"].get<std::string>() << "," << r["impl"].get<std::string>() << "," << r["T"] << "," << r["dtype"].get<std::string>()
         << "," << r["ms"] << "," << r["gflop"] << "," << r["gflops"] << "," << r["pct_of_ceiling"] << ","
         << r.value("speedup_vs_full", 1.0) << "\n";
  }
};

template <class S>
void bench_precision(const Config& base, const std::vector<int64_t>& Ts, int warmup, int reps, double ceiling,
                     const std::string& dtype, BenchRun& run) {
  for (int64_t T : Ts) {
    Config c = base;
    const ref::Inputs<S> in = random_inputs<S>(c, T, 1000 + uint64_t(T));
    ref::check_inputs(c, in);
    const bool tty = isatty(STDOUT_FILENO);
    if (tty) std::cout << "  timing T=" << T << " " << dtype << " ..." << std::flush;
    const double nsa_ms = median_ms([&] { (void)ref::forward(c, in); }, warmup, reps);
    const double full_ms = median_ms([&] { (void)ref::full_attention(c, in.q, in.k, in.v, {}); }, warmup, reps);
    if (tty) std::cout << "\r" << std::string(40, ' ') << "\r";
    const auto f = analysis::nsa_forward_flops(c, T);
    const double full_flop = analysis::full_forward_flops(c, T);
    auto record = [&](const char* impl, double ms, double flop) {
      const double gflops = flop / ms / 1e6;
      return json{{"op", "forward"}, {"impl", impl}, {"T", T}, {"B", 1}, {"Hq", c.Hq}, {"Hkv", c.Hkv},
                  {"dk", c.dk}, {"dv", c.dv}, {"dtype", dtype}, {"ms", ms}, {"gflop", flop / 1e9},
                  {"gflops", gflops}, {"ceiling_gflops", ceiling}, {"pct_of_ceiling", 100 * gflops / ceiling},
                  {"reps", reps}, {"warmup", warmup}};
    };
    json r_nsa = record("nsa_cpu", nsa_ms, f.total());
    r_nsa["flop_by_branch"] = {{"phi", f.phi}, {"cmp", f.cmp}, {"slc", f.slc}, {"win", f.win}};
    r_nsa["baseline_ms"] = full_ms;
    r_nsa["speedup_vs_full"] = full_ms / nsa_ms;
    const json r_full = record("full_cpu", full_ms, full_flop);
    run.add(r_nsa);
    run.add(r_full);
    for (const json* r : {static_cast<const json*>(&r_nsa), &r_full})
      std::cout << "forward " << std::left << std::setw(9) << (*r)["impl"].get<std::string>() << std::right
                << " T=" << std::setw(6) << T << " " << dtype << "  median " << std::fixed << std::setprecision(1)
                << std::setw(9) << (*r)["ms"].get<double>() << " ms (" << reps << " reps)  " << std::setprecision(1)
                << std::setw(7) << (*r)["gflops"].get<double>() << " GFLOP/s = " << std::setprecision(0)
                << std::setw(3) << (*r)["pct_of_ceiling"].get<double>() << "% of " << ceiling << "  "
                << (r == &r_nsa ? cat(std::setprecision(2), std::fixed, full_ms / nsa_ms, "x faster than full")
                                : std::string("(baseline)"))
                << "\n"
                << std::defaultfloat;
  }
}

}  // namespace

int cmd_bench(const Args& args) {
  Command cmd("bench",
              "Time the NSA forward pass against full attention on random inputs (medians after warm-up),\n"
              "with the machine's measured matrix-product rate as the ceiling. Writes bench.json, bench.csv.");
  po::options_description o("Benchmark");
  o.add_options()("T", po::value<std::string>()->default_value("4096,8192,16384"), "sequence lengths, comma-separated")(
      "Hq", po::value<int64_t>()->default_value(16), "query heads")(
      "Hkv", po::value<int64_t>()->default_value(1), "key/value heads")(
      "dk", po::value<int64_t>()->default_value(64), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(64), "value head dim")(
      "precisions", po::value<std::string>()->default_value("float,double"), "CPU arithmetic, comma-separated")(
      "warmup", po::value<int>()->default_value(1), "untimed runs first")(
      "reps", po::value<int>()->default_value(3), "timed runs; the median is reported");
  cmd.add(o);
  cmd.add(nsa_options());
  po::options_description r("Run");
  r.add_options()("device", po::value<std::string>()->default_value("cpu"), "cpu or cuda")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)");
  cmd.add(r);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  require_cpu_device(vm, "bench");
  Config base = block_config(vm);
  base.Hq = vm["Hq"].as<int64_t>(), base.Hkv = vm["Hkv"].as<int64_t>();
  base.dk = vm["dk"].as<int64_t>(), base.dv = vm["dv"].as<int64_t>();
  base.validate();
  const auto Ts = parse_list<int64_t>(vm["T"].as<std::string>(), "T");
  for (int64_t T : Ts)
    if (T < 1) throw ConfigError(cat("T = ", T, " is invalid: expected >= 1"));
  const auto precisions = parse_list<std::string>(vm["precisions"].as<std::string>(), "precisions");
  for (const auto& p : precisions)
    if (p != "float" && p != "double") throw ConfigError(cat("precisions: '", p, "' is not one of: float, double"));
  const int warmup = vm["warmup"].as<int>(), reps = vm["reps"].as<int>();
  if (reps < 1 || warmup < 0) throw ConfigError(cat("reps = ", reps, ", warmup = ", warmup, ": expected reps >= 1, warmup >= 0"));
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());
  BenchRun run;
  run.csv << "op,impl,T,dtype,ms,gflop,gflops,pct_of_ceiling,speedup_vs_full\n";
  json ceilings = json::object();
  const int threads = omp_get_max_threads();
  std::cout << "bench: " << cpu_name() << ", " << threads << " threads; Hq=" << base.Hq << " Hkv=" << base.Hkv
            << " dk=" << base.dk << " dv=" << base.dv << " l=" << base.cmp_len << " d=" << base.cmp_stride
            << " l'=" << base.slc_len << " n=" << base.slc_count << " w=" << base.window << "\n";
  for (const auto& p : precisions) {
    const std::string dtype = p == "float" ? "fp32" : "fp64";
    const double ceiling =
        p == "float" ? ref::measure_gemm_gflops<float>() : ref::measure_gemm_gflops<double>();
    ceilings[dtype] = ceiling;
    std::cout << "ceiling: Eigen " << p << " matrix product 512^3 per thread: " << std::fixed << std::setprecision(1)
              << ceiling << " GFLOP/s\n"
              << std::defaultfloat;
    if (p == "float")
      bench_precision<float>(base, Ts, warmup, reps, ceiling, dtype, run);
    else
      bench_precision<double>(base, Ts, warmup, reps, ceiling, dtype, run);
  }
  std::string command = "nsa bench";
  for (const auto& a : args) command += " " + a;
  json j{{"device", cat("cpu: ", cpu_name(), " x ", threads, " threads")},
         {"date", today()},
         {"command", command},
         {"config", config_json(base)},
         {"ceilings_gflops", ceilings},
         {"records", run.records}};
  out.add_text("bench.csv", run.csv.str());
  out.add_text("bench.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "bench: wrote " << out.dir() << "/bench.json and bench.csv\n";
  return 0;
}

}  // namespace nsa::cli
