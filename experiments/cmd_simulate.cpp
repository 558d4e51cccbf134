// `nsa simulate`: the trace-driven memory simulator (analysis/simulate.hpp, docs/simulate.md).
// Replays a selection (a block_idx file, or one drawn by a selection generator) through a kernel
// schedule and an L2 model; writes simulate.csv (per branch), streams.csv (per tensor),
// reuse.csv (reuse-distance histograms), simulate.json and config.json.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "npy.hpp"
#include "simulate.hpp"

namespace nsa::cli {

namespace {

int dtype_bytes_of(const std::string& d) {
  if (d == "bf16" || d == "fp16") return 2;
  if (d == "fp32") return 4;
  throw ConfigError(cat("dtype = '", d, "' is not one of: bf16, fp16, fp32"));
}

analysis::Branch parse_branch(const std::string& s) {
  if (s == "cmp") return analysis::Branch::Cmp;
  if (s == "slc") return analysis::Branch::Slc;
  if (s == "win") return analysis::Branch::Win;
  throw ConfigError(cat("branch = '", s, "' is not one of: cmp, slc, win"));
}

// A bar redrawn in place on a terminal; nothing otherwise (a log gets the summary at the end).
class Bar {
 public:
  explicit Bar(std::string what) : what_(std::move(what)), tty_(isatty(STDOUT_FILENO)), t0_(clock::now()) {}
  void operator()(double f) {
    if (!tty_) return;
    const double el = std::chrono::duration<double>(clock::now() - t0_).count();
    const int width = 30, fill = int(width * std::min(1.0, f));
    std::cout << "\r" << what_ << " [" << std::string(size_t(fill), '#') << std::string(size_t(width - fill), '.')
              << "] " << std::setw(3) << int(100 * f) << "%, " << std::fixed << std::setprecision(0) << el << " s"
              << (f > 0.02 ? cat(", about ", int(el / f - el), " s left  ") : std::string("  ")) << std::defaultfloat
              << std::flush;
    drawn_ = true;
  }
  ~Bar() {
    if (drawn_) std::cout << "\n";
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string what_;
  bool tty_, drawn_ = false;
  clock::time_point t0_;
};

}  // namespace

int cmd_simulate(const Args& args) {
  Command cmd("simulate",
              "Trace-driven memory simulation of NSA's kernels: replays a selection (--block-idx, or one drawn by\n"
              "--selection) through a kernel schedule (query- or block-centric tiles, CTAs per SM, CTA order)\n"
              "and a set-associative L2; writes the bytes each branch reads from L2 and HBM, per tensor,\n"
              "reuse-distance histograms and the time at the GPU's ceilings: simulate.csv, streams.csv,\n"
              "reuse.csv, simulate.json. Definitions: docs/simulate.md.");
  po::options_description src("Selection");
  src.add_options()("block-idx", po::value<std::string>(),
                    "int32/int64 [T, Hkv, n] or [B, T, Hkv, n]: a selection, e.g. nsa forward's block_idx.npy")(
      "selection", po::value<std::string>(), "draw one instead: random, clustered or recent")(
      "T", po::value<int64_t>()->default_value(8192), "--selection: tokens per sequence")(
      "batch", po::value<int64_t>()->default_value(1), "--selection: sequences")(
      "corr-len", po::value<double>()->default_value(64), "--selection clustered: positions a block stays selected")(
      "selection-seed", po::value<uint64_t>()->default_value(0), "--selection: seed")(
      "save-block-idx", po::bool_switch(), "also write the selection as block_idx.npy")(
      "generate-only", po::bool_switch(), "--selection: write block_idx.npy (and config.json) and stop");
  cmd.add(src);
  po::options_description shape("Shape");
  shape.add_options()("Hq", po::value<int64_t>()->default_value(64), "query heads")(
      "Hkv", po::value<int64_t>()->default_value(4), "key/value heads (--selection; a file gives its own)")(
      "dk", po::value<int64_t>()->default_value(128), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(128), "value head dim")(
      "dtype", po::value<std::string>()->default_value("bf16"), "q, K, V, o element type: bf16, fp16, fp32");
  cmd.add(shape);
  po::options_description sch("Schedule (default: today's selection kernel, v4)");
  sch.add_options()("schedule", po::value<std::string>()->default_value("query"), "query, block or both")(
      "branches", po::value<std::string>()->default_value("slc"), "kernels to replay: cmp, slc, win, comma-separated")(
      "order", po::value<std::string>()->default_value("group"),
      "CTA order: group (every tile of KV head 0 first) or position")(
      "tile-positions", po::value<int64_t>()->default_value(0), "positions per tile (0: 16 / G, at least 1)")(
      "tile-heads", po::value<int64_t>()->default_value(0), "query heads per tile (0: G, group-centric)")(
      "tiles-per-cta", po::value<int64_t>()->default_value(2), "tiles (warps) per CTA")(
      "ctas-per-sm", po::value<int64_t>()->default_value(0), "resident CTAs per SM (0: the kernel's shared-memory fit)")(
      "sms", po::value<int64_t>()->default_value(0), "SMs (0: the GPU's)")(
      "chunk-rows", po::value<int64_t>()->default_value(32), "K/V rows per pipeline step")(
      "cta-union", po::bool_switch(), "a CTA's tiles load the union of their blocks once (shared-memory reuse)")(
      "block-positions", po::value<int64_t>()->default_value(64), "block-centric: positions per CTA");
  cmd.add(sch);
  po::options_description mem("GPU and L2");
  mem.add_options()("gpu", po::value<std::string>()->default_value("h200"), "preset: h200, h100, a100, b200")(
      "l2-mb", po::value<double>(), "L2 size in MiB (overrides the preset)")(
      "l2-ways", po::value<int64_t>(), "L2 associativity")("l2-line", po::value<int64_t>(), "L2 line bytes")(
      "l2-sector", po::value<int64_t>(), "L2 sector bytes")(
      "l2-policy", po::value<std::string>()->default_value("lru"), "L2 replacement: lru, fifo, random")(
      "copy-tbs", po::value<double>(), "HBM ceiling, TB/s (device copy)")(
      "l2-tbs", po::value<double>(), "L2 read ceiling, TB/s")("matrix-tflops", po::value<double>(),
                                                                  "matrix ceiling, TFLOP/s")(
      "sample", po::value<int64_t>()->default_value(0), "simulate 1 in N L2 sets (0: automatic, 1: exact)")(
      "reuse-sample", po::value<int64_t>()->default_value(0),
      "track 1 in N lines for reuse distances (0: automatic, -1: no histogram)");
  cmd.add(mem);
  cmd.add(nsa_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  if (vm.count("block-idx") == vm.count("selection"))
    throw UsageError("give one of --block-idx FILE or --selection random|clustered|recent");
  if (vm["generate-only"].as<bool>() && !vm.count("selection"))
    throw UsageError("--generate-only draws a selection: give --selection");

  Config c = block_config(vm);
  c.Hq = vm["Hq"].as<int64_t>(), c.Hkv = vm["Hkv"].as<int64_t>();
  c.dk = vm["dk"].as<int64_t>(), c.dv = vm["dv"].as<int64_t>();
  const std::string dtype = vm["dtype"].as<std::string>();
  const int eb = dtype_bytes_of(dtype);

  analysis::Selection sel;
  std::string source;
  json jsel = json::object();  // what was replayed: a file, or the generator's settings
  if (vm.count("block-idx")) {
    const std::string path = vm["block-idx"].as<std::string>();
    // The header first: shape, dtype and the memory the run needs are checked before the data is
    // read (the selection as int32, its per-block lists, the simulated L2, the reuse tracker).
    Tensor<int32_t> bi;
    Shape sh;
    try {
      const NpyHeader h = read_npy_header(path);
      sh = h.shape;
      if (sh.size() != 3 && sh.size() != 4)
        throw InputError(cat(path, ": shape ", shape_str(sh), " is not [T, Hkv, n] or [B, T, Hkv, n]"));
      if (h.dtype != DType::I32 && h.dtype != DType::I64)
        throw InputError(cat(path, ": dtype ", dtype_name(h.dtype),
                             " where an integer tensor (int32 or int64) is expected"));
      require_memory(double(numel(sh)) * 4 * 3 + double(h.data_bytes), "simulate (the selection and its lists)");
      bi = load_npy<int32_t>(path);
    } catch (const InputError& e) {
      throw InputError(cat("--block-idx ", e.what()));
    }
    const int64_t B = sh.size() == 4 ? sh[0] : 1, T = sh[sh.size() - 3];
    c.Hkv = sh[sh.size() - 2];
    if (!vm["slc-count"].defaulted() && vm["slc-count"].as<int64_t>() != sh.back())
      throw InputError(cat(path, ": n = ", sh.back(), " blocks per position, but --slc-count = ",
                           vm["slc-count"].as<int64_t>()));
    c.slc_count = sh.back();
    if (!vm["Hkv"].defaulted() && vm["Hkv"].as<int64_t>() != c.Hkv)
      throw InputError(cat(path, ": Hkv = ", c.Hkv, ", but --Hkv = ", vm["Hkv"].as<int64_t>()));
    sel.block_idx = std::move(bi).reshaped({B * T, c.Hkv, c.slc_count});
    for (int64_t b = 0; b <= B; ++b) sel.cu_seqlens.push_back(b * T);
    source = path;
    jsel = {{"kind", "file"}, {"path", path}, {"T", T}, {"batch", B}};
  }
  if (c.Hq % c.Hkv)
    throw ConfigError(cat("Hq = ", c.Hq, " is invalid: expected a multiple of Hkv = ", c.Hkv));
  c.validate();
  if (vm.count("selection")) {
    analysis::SelectionSpec sp;
    sp.kind = vm["selection"].as<std::string>();
    sp.T = vm["T"].as<int64_t>(), sp.B = vm["batch"].as<int64_t>(), sp.Hkv = c.Hkv;
    sp.seed = vm["selection-seed"].as<uint64_t>(), sp.corr_len = vm["corr-len"].as<double>();
    require_memory(double(sp.T * sp.B * c.Hkv * c.slc_count) * 4 * 2, "the selection");
    sel = analysis::draw_selection(c, sp);
    jsel = {{"kind", sp.kind}, {"T", sp.T}, {"batch", sp.B}, {"seed", sp.seed}, {"corr_len", sp.corr_len}};
    source = cat("selection ", sp.kind, " (T = ", sp.T, ", batch ", sp.B, ", seed ", sp.seed,
                 sp.kind == "clustered" ? cat(", corr_len ", sp.corr_len) : std::string(), ")");
  } else {
    analysis::check_selection(c, sel, vm["block-idx"].as<std::string>());
  }

  analysis::SimOptions opt;
  opt.gpu = analysis::gpu_preset(vm["gpu"].as<std::string>());
  if (vm.count("l2-mb")) opt.gpu.l2.size_bytes = int64_t(vm["l2-mb"].as<double>() * 1048576.0);
  if (vm.count("l2-ways")) opt.gpu.l2.ways = vm["l2-ways"].as<int64_t>();
  if (vm.count("l2-line")) opt.gpu.l2.line_bytes = vm["l2-line"].as<int64_t>();
  if (vm.count("l2-sector")) opt.gpu.l2.sector_bytes = vm["l2-sector"].as<int64_t>();
  opt.gpu.l2.policy = analysis::parse_cache_policy(vm["l2-policy"].as<std::string>());
  opt.gpu.l2.validate();
  auto ceiling = [&](const char* name, double scale, double& field) {
    if (!vm.count(name)) return;
    const double v = vm[name].as<double>();
    if (!(v > 0) || !std::isfinite(v)) throw ConfigError(cat(name, " = ", v, ": expected a number > 0"));
    field = v * scale;
  };
  ceiling("copy-tbs", 1e12, opt.gpu.copy_bytes_per_s);
  ceiling("l2-tbs", 1e12, opt.gpu.l2_bytes_per_s);
  ceiling("matrix-tflops", 1e12, opt.gpu.matrix_flops_per_s);
  opt.dtype_bytes = eb;
  opt.sample = vm["sample"].as<int64_t>();
  opt.reuse_sample = vm["reuse-sample"].as<int64_t>();
  opt.branches.clear();
  for (const auto& b : parse_list<std::string>(vm["branches"].as<std::string>(), "branches"))
    opt.branches.push_back(parse_branch(b));
  analysis::Schedule& s = opt.schedule;
  s.order = analysis::parse_tile_order(vm["order"].as<std::string>());
  s.tile_positions = vm["tile-positions"].as<int64_t>(), s.tile_heads = vm["tile-heads"].as<int64_t>();
  s.tiles_per_cta = vm["tiles-per-cta"].as<int64_t>(), s.ctas_per_sm = vm["ctas-per-sm"].as<int64_t>();
  s.sms = vm["sms"].as<int64_t>(), s.chunk_rows = vm["chunk-rows"].as<int64_t>();
  s.cta_union = vm["cta-union"].as<bool>(), s.block_positions = vm["block-positions"].as<int64_t>();
  const std::string sched = vm["schedule"].as<std::string>();
  std::vector<analysis::ScheduleKind> kinds;
  if (sched == "both")
    kinds = {analysis::ScheduleKind::QueryCentric, analysis::ScheduleKind::BlockCentric};
  else
    kinds = {analysis::parse_schedule(sched)};

  analysis::check_options(opt);
  if (s.tile_heads > 0 && c.G() % s.tile_heads)
    throw ConfigError(cat("tile heads = ", s.tile_heads, " must divide G = ", c.G()));
  OutputDir out(vm["out"].as<std::string>());
  json cfgj = resolved_config(cmd, vm);
  cfgj["config"] = config_json(c);
  cfgj["source"] = source;
  if (vm["save-block-idx"].as<bool>() || vm["generate-only"].as<bool>()) out.add("block_idx", sel.block_idx);
  if (vm["generate-only"].as<bool>()) {
    out.add_text("config.json", cfgj.dump(2) + "\n");
    out.commit();
    std::cout << "simulate: wrote " << out.dir() << "/block_idx.npy (" << source << ")\n";
    return 0;
  }
  // The memory this run holds: the selection (and, block-centric, its per-block lists), the
  // simulated L2 and the reuse tracker's map of tracked lines.
  const double N = double(sel.cu_seqlens.back());
  require_memory(N * double(c.Hkv * c.slc_count) * 4 * 3 + double(opt.gpu.l2.sets() * opt.gpu.l2.ways) * 32 +
                     N * double(c.Hq * (c.dk + c.dv) * eb) / double(opt.gpu.l2.line_bytes) * 48,
                 "simulate (selection, L2 model, reuse tracker)");

  std::ostringstream csv, streams, reuse;
  csv << "schedule,branch,l2_read_bytes,l2_write_bytes,hbm_read_bytes,hbm_read_stderr,hbm_write_bytes,"
         "sector_read_hit_rate,useful_flops,executed_flops,formula_bytes,kv_block_loads,ctas,tiles,ctas_resident,"
         "ms_hbm,ms_l2,ms_matrix,predicted_ms,bound\n";
  streams << "schedule,branch,stream,l2_read_bytes,l2_write_bytes,hbm_read_bytes\n";
  reuse << "schedule,branch,kind,distance_lo_bytes,distance_hi_bytes,accesses,fraction\n";
  json jres = json::array();
  std::cout << "simulate: " << source << "; " << opt.gpu.name << " L2 " << human_bytes(double(opt.gpu.l2.size_bytes))
            << " (" << opt.gpu.l2.ways << "-way, " << opt.gpu.l2.line_bytes << " B lines, "
            << to_string(opt.gpu.l2.policy) << ")\n"
            << "  schedule  branch      L2 read     HBM read  hit rate  formula bytes  predicted ms  bound\n";
  for (analysis::ScheduleKind k : kinds) {
    opt.schedule.kind = k;
    Bar bar(cat("simulate ", analysis::to_string(k)));
    opt.progress = [&bar](double f) { bar(f); };
    const analysis::SimResult res = analysis::simulate(c, sel, opt);
    opt.progress = nullptr;
    json jb = json::array();
    for (const analysis::BranchResult& r : res.branches) {
      const char* sn = analysis::to_string(k);
      const char* bn = analysis::to_string(r.branch);
      csv << sn << "," << bn << "," << csv_num(r.l2_read_bytes) << "," << csv_num(r.l2_write_bytes) << ","
          << csv_num(r.hbm_read_bytes) << "," << csv_num(r.hbm_read_stderr) << "," << csv_num(r.hbm_write_bytes) << ","
          << csv_num(r.sector_read_hit_rate) << "," << csv_num(r.useful_flops) << "," << csv_num(r.executed_flops)
          << "," << csv_num(r.formula_bytes) << "," << r.kv_block_loads << "," << r.ctas << "," << r.tiles << ","
          << r.ctas_resident << "," << csv_num(r.ms_hbm) << "," << csv_num(r.ms_l2) << "," << csv_num(r.ms_matrix)
          << "," << csv_num(r.predicted_ms) << "," << r.bound << "\n";
      json js = json::object();
      for (int i = 0; i < analysis::kStreams; ++i) {
        const analysis::StreamTraffic& st = r.streams[i];
        if (st.l2_read_bytes == 0 && st.l2_write_bytes == 0) continue;
        const char* name = analysis::to_string(analysis::Stream(i));
        streams << sn << "," << bn << "," << name << "," << csv_num(st.l2_read_bytes) << ","
                << csv_num(st.l2_write_bytes) << "," << csv_num(st.hbm_read_bytes) << "\n";
        js[name] = {{"l2_read_bytes", st.l2_read_bytes}, {"l2_write_bytes", st.l2_write_bytes},
                    {"hbm_read_bytes", st.hbm_read_bytes}};
      }
      json jr = json::array();
      if (res.reuse_sample > 0) {
        double total = r.reuse.cold;
        for (double v : r.reuse.count) total += v;
        auto frac = [&](double v) { return total > 0 ? v / total : 0.0; };
        for (int i = 0; i < analysis::ReuseHistogram::kBins; ++i) {
          const double lo = analysis::ReuseHistogram::bin_lo(i), hi = analysis::ReuseHistogram::bin_hi(i);
          reuse << sn << "," << bn << ",warm," << csv_num(lo) << "," << (std::isinf(hi) ? "inf" : csv_num(hi)) << ","
                << csv_num(r.reuse.count[size_t(i)]) << "," << csv_num(frac(r.reuse.count[size_t(i)])) << "\n";
          jr.push_back({{"lo", lo}, {"hi", json_num(std::isinf(hi) ? NAN : hi)}, {"accesses", r.reuse.count[size_t(i)]}});
        }
        reuse << sn << "," << bn << ",cold,nan,nan," << csv_num(r.reuse.cold) << "," << csv_num(frac(r.reuse.cold))
              << "\n";
      }
      jb.push_back({{"branch", bn},
                    {"l2_read_bytes", r.l2_read_bytes},
                    {"l2_write_bytes", r.l2_write_bytes},
                    {"hbm_read_bytes", r.hbm_read_bytes},
                    {"hbm_read_stderr", r.hbm_read_stderr},
                    {"hbm_write_bytes", r.hbm_write_bytes},
                    {"sector_read_hit_rate", r.sector_read_hit_rate},
                    {"useful_flops", r.useful_flops},
                    {"executed_flops", r.executed_flops},
                    {"formula_bytes", r.formula_bytes},
                    {"kv_block_loads", r.kv_block_loads},
                    {"ctas", r.ctas},
                    {"tiles", r.tiles},
                    {"ctas_resident", r.ctas_resident},
                    {"ms_hbm", r.ms_hbm},
                    {"ms_l2", r.ms_l2},
                    {"ms_matrix", r.ms_matrix},
                    {"predicted_ms", r.predicted_ms},
                    {"bound", r.bound},
                    {"streams", js},
                    {"reuse", {{"bins", jr}, {"cold", r.reuse.cold}}}});
      std::cout << std::setw(10) << sn << std::setw(8) << bn << std::setw(13) << human_bytes(r.l2_read_bytes)
                << std::setw(13) << human_bytes(r.hbm_read_bytes) << std::fixed << std::setprecision(3)
                << std::setw(10) << r.sector_read_hit_rate << std::setw(15) << human_bytes(r.formula_bytes)
                << std::setw(14) << r.predicted_ms << "  " << r.bound << std::defaultfloat << std::setprecision(6)
                << "\n";
    }
    std::cout << "  (" << analysis::to_string(k) << ": " << std::fixed << std::setprecision(1) << res.seconds
              << " s; L2 sets sampled 1 in " << res.sample << ", reuse lines 1 in " << res.reuse_sample << ", "
              << res.ctas_per_sm << " CTAs per SM)\n"
              << std::defaultfloat << std::setprecision(6);
    jres.push_back({{"schedule", analysis::to_string(k)},
                    {"sample", res.sample},
                    {"reuse_sample", res.reuse_sample},
                    {"ctas_per_sm", res.ctas_per_sm},
                    {"seconds", res.seconds},
                    {"branches", jb}});
  }
  const analysis::GpuSpec& g = opt.gpu;
  json j = {{"source", source},
            {"selection", jsel},
            {"config", config_json(c)},
            {"dtype", dtype},
            {"positions", int64_t(N)},
            {"sequences", int64_t(sel.cu_seqlens.size()) - 1},
            {"gpu",
             {{"name", g.name},
              {"sms", g.sms},
              {"l2_bytes", g.l2.size_bytes},
              {"l2_line_bytes", g.l2.line_bytes},
              {"l2_sector_bytes", g.l2.sector_bytes},
              {"l2_ways", g.l2.ways},
              {"l2_policy", to_string(g.l2.policy)},
              {"copy_bytes_per_s", g.copy_bytes_per_s},
              {"l2_bytes_per_s", g.l2_bytes_per_s},
              {"matrix_flops_per_s", g.matrix_flops_per_s},
              {"source", g.source}}},
            {"schedule",
             {{"order", to_string(s.order)},
              {"tile_positions", s.tile_positions},
              {"tile_heads", s.tile_heads},
              {"tiles_per_cta", s.tiles_per_cta},
              {"ctas_per_sm", s.ctas_per_sm},
              {"sms", s.sms},
              {"chunk_rows", s.chunk_rows},
              {"cta_union", s.cta_union},
              {"block_positions", s.block_positions}}},
            {"results", jres}};
  out.add_text("simulate.csv", csv.str());
  out.add_text("streams.csv", streams.str());
  out.add_text("reuse.csv", reuse.str());
  out.add_text("simulate.json", j.dump(2) + "\n");
  out.add_text("config.json", cfgj.dump(2) + "\n");
  out.commit();
  std::cout << "simulate: wrote " << out.dir() << "/simulate.csv, streams.csv, reuse.csv, simulate.json\n";
  return 0;
}

}  // namespace nsa::cli
