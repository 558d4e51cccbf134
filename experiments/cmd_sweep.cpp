// `nsa sweep`: a grid over NSA settings and workload parameters (every axis a comma list; the
// grid is their cartesian product), one row of metrics per point in sweep.csv and sweep.json
// (the columns: sweep.hpp, docs/experiments.md).
//
// Resumable: sweep.csv is rewritten (atomically) after every finished point, and a rerun skips
// the points whose parameter cells are already there. Parallel: points run on --jobs threads,
// each giving the reference's OpenMP loops its share of the cores; the reference's results do
// not depend on its thread count, so neither do the rows (apart from the timing columns), and the
// final file is in grid order whatever finished first.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <mutex>
#include <set>
#include <thread>

#include "cli.hpp"
#include "commands.hpp"
#include "npy.hpp"
#include "sweep.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

namespace {

std::string fmt_duration(double s) {
  const int64_t t = std::llround(s);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

// A bar redrawn in place on a terminal; one plain line per point otherwise (logs, CI).
class Progress {
 public:
  Progress(size_t total) : total_(total), tty_(isatty(STDOUT_FILENO)), t0_(std::chrono::steady_clock::now()) {}
  void point_done(const std::string& what, double seconds) {
    ++done_;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double eta = el / double(done_) * double(total_ - done_);
    if (tty_) {
      const int width = 30, fill = int(width * done_ / std::max<size_t>(total_, 1));
      std::cout << "\r[" << std::string(size_t(fill), '#') << std::string(size_t(width - fill), '.') << "] " << done_
                << "/" << total_ << " points, " << fmt_duration(el) << " elapsed, ETA " << fmt_duration(eta) << "  "
                << std::flush;
      if (done_ == total_) std::cout << "\n";
    } else {
      std::cout << "sweep: point " << done_ << "/" << total_ << " done in " << std::fixed << std::setprecision(2)
                << seconds << " s (" << what << "); elapsed " << fmt_duration(el) << ", ETA " << fmt_duration(eta)
                << "\n"
                << std::defaultfloat << std::flush;
    }
  }
  void abort() {
    if (tty_ && done_ < total_) std::cout << "\n";
  }

 private:
  size_t total_, done_ = 0;
  bool tty_;
  std::chrono::steady_clock::time_point t0_;
};

std::string short_label(const SweepPoint& p) {
  const Config& c = p.cfg;
  std::string s = cat("T=", p.spec.T);
  if (p.spec.workload == "needle") s += cat(" depth=", p.spec.depths[0], " strength=", p.spec.needle_strength);
  if (p.spec.workload == "clustered") s += cat(" corr_len=", p.spec.corr_len);
  return s + cat(" l=", c.cmp_len, " d=", c.cmp_stride, " l'=", c.slc_len, " n=", c.slc_count, " w=", c.window, " ",
                 to_string(c.compress), " ", analysis::to_string(p.selector), " ", p.precision);
}

std::string today() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&t));
  return buf;
}

po::options_description workload_axes() {
  po::options_description o("Workload (lists are comma-separated and swept)");
  o.add_options()("workload", po::value<std::string>()->default_value("random"),
                  "random, needle, clustered (nsa gen), or npy: real q.npy, k.npy, v.npy in --data")(
      "data", po::value<std::string>(), "npy: folder of q.npy, k.npy, v.npy ([T, H, D] or [B, T, H, D])")(
      "context", po::value<std::string>()->default_value("2048"),
      "LIST of context lengths T (npy: the first T tokens of each sequence; 0: all)")(
      "depth", po::value<std::string>()->default_value("0.5"), "needle: LIST of depths in [0, 1]")(
      "needle-strength", po::value<std::string>()->default_value("8"),
      "needle: LIST of logit margins of the needle, in haystack-logit std")(
      "needle-len", po::value<int64_t>()->default_value(16), "needle: tokens the needle spans")(
      "questions", po::value<int64_t>()->default_value(16), "needle: question queries at the end (the evaluated rows)")(
      "corr-len", po::value<std::string>()->default_value("64"), "clustered: LIST of correlation lengths, tokens")(
      "cluster-strength", po::value<double>()->default_value(2.0), "clustered: std of the keys' latent part")(
      "Hq", po::value<int64_t>()->default_value(16), "query heads (synthetic workloads)")(
      "Hkv", po::value<int64_t>()->default_value(1), "key/value heads")(
      "dk", po::value<int64_t>()->default_value(64), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(64), "value head dim")(
      "seed", po::value<uint64_t>()->default_value(0), "seed of the workload and of the drawn phi parameters");
  return o;
}

po::options_description nsa_axes() {
  po::options_description o("NSA settings (lists are swept; defaults are the paper's)");
  o.add_options()("cmp-len", po::value<std::string>()->default_value("32"), "LIST of l")(
      "cmp-stride", po::value<std::string>()->default_value("16"), "LIST of d")(
      "slc-len", po::value<std::string>()->default_value("64"), "LIST of l'")(
      "slc-count", po::value<std::string>()->default_value("16"), "LIST of n")(
      "window", po::value<std::string>()->default_value("512"), "LIST of w")(
      "init-blocks", po::value<std::string>()->default_value("1"), "LIST of always-selected leading blocks")(
      "local-blocks", po::value<std::string>()->default_value("2"), "LIST of always-selected local blocks")(
      "compress", po::value<std::string>()->default_value("mlp"), "LIST of phi kinds: mean, linear, mlp")(
      "compress-params", po::value<std::string>(),
      "folder of phi parameters (e.g. from nsa train); default: drawn from --seed")(
      "selector", po::value<std::string>()->default_value("nsa"),
      "LIST of selectors scored by recall, mass, needle_found: nsa, oracle, quest, meanpool, random, window")(
      "cmp-hidden", po::value<int64_t>()->default_value(0), "h_c of the mlp phi (0: the head dim)")(
      "cmp-act", po::value<std::string>()->default_value("gelu"), "mlp phi activation")(
      "scale", po::value<double>()->default_value(0.0), "softmax scale (0: 1/sqrt(dk))");
  return o;
}

po::options_description sweep_run_options() {
  po::options_description o("Run");
  o.add_options()("precision", po::value<std::string>()->default_value("double"), "LIST of double, float")(
      "jobs", po::value<int>()->default_value(0), "points run at once (0: one per core, at most the points)")(
      "threads", po::value<int>()->default_value(0), "CPU threads in all (0: all cores), shared by the jobs")(
      "time", po::value<std::string>()->default_value("none"),
      "none, or cpu: also time the NSA forward and full attention (median of --reps; runs one job at a time)")(
      "reps", po::value<int>()->default_value(3), "timed runs per point (--time)")(
      "warmup", po::value<int>()->default_value(1), "untimed runs first (--time)")(
      "device", po::value<std::string>()->default_value("cpu"), "cpu (cuda timing: see docs/experiments.md)");
  return o;
}

SweepAxes axes_from(const po::variables_map& vm) {
  SweepAxes a;
  GenSpec& s = a.spec;
  s.workload = vm["workload"].as<std::string>();
  if (s.workload == "npy") {
    if (!vm.count("data")) throw UsageError("--workload npy needs --data DIR (q.npy, k.npy, v.npy)");
    a.data = vm["data"].as<std::string>();
  } else if (vm.count("data")) {
    throw UsageError(cat("--data is for --workload npy, not '", s.workload, "'"));
  }
  s.Hq = vm["Hq"].as<int64_t>(), s.Hkv = vm["Hkv"].as<int64_t>();
  s.dk = vm["dk"].as<int64_t>(), s.dv = vm["dv"].as<int64_t>();
  s.seed = vm["seed"].as<uint64_t>();
  s.needle_len = vm["needle-len"].as<int64_t>();
  s.questions = vm["questions"].as<int64_t>();
  s.cluster_strength = vm["cluster-strength"].as<double>();
  a.context = parse_list<int64_t>(vm["context"].as<std::string>(), "context");
  a.depth = parse_list<double>(vm["depth"].as<std::string>(), "depth");
  a.needle_strength = parse_list<double>(vm["needle-strength"].as<std::string>(), "needle-strength");
  a.corr_len = parse_list<double>(vm["corr-len"].as<std::string>(), "corr-len");
  a.cmp_len = parse_list<int64_t>(vm["cmp-len"].as<std::string>(), "cmp-len");
  a.cmp_stride = parse_list<int64_t>(vm["cmp-stride"].as<std::string>(), "cmp-stride");
  a.slc_len = parse_list<int64_t>(vm["slc-len"].as<std::string>(), "slc-len");
  a.slc_count = parse_list<int64_t>(vm["slc-count"].as<std::string>(), "slc-count");
  a.window = parse_list<int64_t>(vm["window"].as<std::string>(), "window");
  a.init_blocks = parse_list<int64_t>(vm["init-blocks"].as<std::string>(), "init-blocks");
  a.local_blocks = parse_list<int64_t>(vm["local-blocks"].as<std::string>(), "local-blocks");
  a.compress = parse_list<std::string>(vm["compress"].as<std::string>(), "compress");
  a.selector = parse_list<std::string>(vm["selector"].as<std::string>(), "selector");
  a.precision = parse_list<std::string>(vm["precision"].as<std::string>(), "precision");
  if (vm.count("compress-params")) a.compress_params = vm["compress-params"].as<std::string>();
  a.base.cmp_hidden = vm["cmp-hidden"].as<int64_t>();
  a.base.cmp_act = parse_activation(vm["cmp-act"].as<std::string>());
  a.base.scale = vm["scale"].as<double>();
  return a;
}

// Bytes one point holds at once: its workload (inputs, full attention) and the forward's outputs.
double point_bytes(const SweepPoint& p) {
  const Config& c = p.cfg;
  const double T = double(p.spec.T > 0 ? p.spec.T : 1);
  const double tok = c.Hq * (c.dk + 6.0 * c.dv + 8) + c.Hkv * (c.dk + c.dv + c.slc_count + T / double(c.slc_len));
  return T * tok * 8 * 2 + 64e6;
}

}  // namespace

int cmd_sweep(const Args& args) {
  Command cmd("sweep",
              "A grid over NSA settings and workload parameters: every LIST option is swept, the grid is their\n"
              "cartesian product. Per point: selected-block recall and attention mass against the exact oracle,\n"
              "output error against full attention, needle retrieval, FLOPs and modelled memory traffic (and\n"
              "times with --time cpu). Writes sweep.csv and sweep.json (fixed columns: docs/experiments.md)\n"
              "into --out; rerunning into the same folder skips the points already there.");
  cmd.add(workload_axes());
  cmd.add(nsa_axes());
  cmd.add(sweep_run_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  require_cpu_device(vm, "sweep");
  const std::string time_mode = vm["time"].as<std::string>();
  if (time_mode != "none" && time_mode != "cpu")
    throw ConfigError(cat("time = '", time_mode, "' is not one of: none, cpu"));
  Timing timing;
  timing.enabled = time_mode == "cpu";
  timing.reps = vm["reps"].as<int>(), timing.warmup = vm["warmup"].as<int>();
  if (timing.reps < 1 || timing.warmup < 0)
    throw ConfigError(cat("reps = ", timing.reps, ", warmup = ", timing.warmup, ": expected reps >= 1, warmup >= 0"));

  const SweepAxes axes = axes_from(vm);
  const std::vector<SweepPoint> grid = expand(axes);
  const std::string dir = vm["out"].as<std::string>();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) throw InputError(cat(dir, ": cannot create output folder (", ec.message(), ")"));
  const std::string csv_path = (fs::path(dir) / "sweep.csv").string(), json_path = (fs::path(dir) / "sweep.json").string();

  // Rows already there (a resumed sweep) are kept and their points skipped.
  std::vector<json> rows = read_sweep_csv(csv_path);
  std::set<std::string> done;
  for (const auto& r : rows) done.insert(row_key(r));
  std::vector<SweepPoint> todo;
  for (const auto& p : grid)
    if (!done.count(row_key(point_params(p)))) todo.push_back(p);

  const int cores = std::max(1u, std::thread::hardware_concurrency());
  const int threads = vm["threads"].as<int>() > 0 ? vm["threads"].as<int>() : cores;
  int jobs = vm["jobs"].as<int>() > 0 ? vm["jobs"].as<int>() : threads;
  if (timing.enabled) jobs = 1;  // concurrent points would disturb each other's times
  jobs = std::max(1, std::min<int>(jobs, int(todo.size())));
  const int per_job = std::max(1, threads / jobs);
  double peak = 0;
  for (const auto& p : todo) peak = std::max(peak, point_bytes(p));
  require_memory(peak * jobs, "the sweep's concurrent points");

  std::cout << "sweep: " << grid.size() << " points (" << grid.size() - todo.size() << " already in " << csv_path
            << "), " << todo.size() << " to run on " << jobs << " job(s) x " << per_job << " thread(s)\n"
            << std::flush;

  std::string command = "nsa sweep";
  for (const auto& a : args) command += " " + a;
  json columns = json::array();
  for (const auto& c : sweep_columns())
    columns.push_back({{"name", c.name},
                       {"kind", c.kind == ColumnKind::Text ? "text" : c.kind == ColumnKind::Int ? "int" : "real"},
                       {"param", c.param},
                       {"doc", c.doc}});
  // Grid points first in grid order, then rows of earlier sweeps that are not in this grid: the
  // file does not depend on which point finished first, nor on whether the sweep was resumed.
  auto ordered = [&](const std::vector<json>& all) {
    std::map<std::string, const json*> by_key;
    for (const auto& r : all) by_key[row_key(r)] = &r;
    std::vector<json> out;
    std::set<std::string> in_grid;
    for (const auto& p : grid) {
      const std::string k = row_key(point_params(p));
      in_grid.insert(k);
      if (auto it = by_key.find(k); it != by_key.end()) out.push_back(*it->second);
    }
    for (const auto& r : all)
      if (!in_grid.count(row_key(r))) out.push_back(r);
    return out;
  };
  auto write = [&](const std::vector<json>& all) {
    const auto out = ordered(all);
    write_file_atomic(csv_path, sweep_csv(out));
    const json j{{"command", command}, {"date", today()}, {"columns", columns}, {"records", out}};
    write_file_atomic(json_path, j.dump(1) + "\n");
  };

  WorkloadCache cache(todo);
  Progress progress(todo.size());
  std::mutex mu;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto worker = [&] {
    ref::set_threads(per_job);  // this thread's OpenMP team size
    for (size_t i; !failed && (i = next++) < todo.size();) {
      try {
        const SweepPoint& p = todo[i];
        const auto data = cache.get(p);
        json row = evaluate(p, *data, timing);
        cache.release(p);
        std::lock_guard<std::mutex> lock(mu);
        rows.push_back(std::move(row));
        write(rows);
        progress.point_done(short_label(p), rows.back()["seconds"].get<double>());
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!failed.exchange(true)) error = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int j = 0; j < jobs; ++j) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  if (error) {
    progress.abort();
    std::cerr << "sweep: stopped; the finished points are in " << csv_path << " (rerun to resume)\n";
    std::rethrow_exception(error);
  }
  write(rows);
  json cfg = resolved_config(cmd, vm);
  cfg["points"] = grid.size();
  write_file_atomic((fs::path(dir) / "config.json").string(), cfg.dump(2) + "\n");
  std::cout << "sweep: wrote " << csv_path << " and " << json_path << " (" << rows.size() << " rows)\n";
  return 0;
}

}  // namespace nsa::cli
