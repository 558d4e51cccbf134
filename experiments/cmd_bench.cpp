// `nsa bench`: NSA forward (and backward) against full attention, timed in one run (STYLE 8): medians after
// warm-up, useful FLOPs (analysis/cost.hpp), the machine's measured matrix-product rate as the
// ceiling, and full attention measured in the same run as the baseline. Writes bench.json and
// bench.csv into --out; one line per case on stdout as each finishes.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

#include "ceiling.hpp"
#include "cli.hpp"
#include "commands.hpp"
#include "cost.hpp"
#include "timing.hpp"
#include "decode.hpp"
#include "rng.hpp"
#include "traffic.hpp"
#ifdef NSA_WITH_CUDA
#include "nsa_cuda.hpp"
#endif

namespace nsa::cli {

namespace {

// Timing (core/timing.hpp): median_ms of wall or process CPU time; with one thread the CPU time is
// the time the work took even on a machine shared with other jobs, where wall time also counts
// the time slices given to them.

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
                     const std::string& dtype, bool backward, bool cpu_clock, BenchRun& run) {
  for (int64_t T : Ts) {
    Config c = base;
    const ref::Inputs<S> in = random_inputs<S>(c, T, 1000 + uint64_t(T));
    ref::check_inputs(c, in);
    const bool tty = isatty(STDOUT_FILENO);
    if (tty) std::cout << "  timing T=" << T << " " << dtype << " ..." << std::flush;
    const double nsa_ms = median_ms([&] { (void)ref::forward(c, in); }, warmup, reps, cpu_clock);
    const double full_ms = median_ms([&] { (void)ref::full_attention(c, in.q, in.k, in.v, {}); }, warmup, reps, cpu_clock);
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
    if (!backward) continue;
    // The backward passes given their forward results, against the forward times above.
    Tensor<S> dO({T, c.Hq, c.dv});
    Rng rng(2000 + uint64_t(T));
    for (auto& v : dO.vec()) v = static_cast<S>(rng.normal());
    if (tty) std::cout << "  timing backward T=" << T << " " << dtype << " ..." << std::flush;
    const auto fwd = ref::forward(c, in);
    const double nsa_bwd = median_ms([&] { (void)ref::backward(c, in, fwd, dO); }, warmup, reps, cpu_clock);
    const auto full_fwd = ref::full_attention(c, in.q, in.k, in.v, {});
    const double full_bwd =
        median_ms([&] { (void)ref::full_attention_backward(c, in.q, in.k, in.v, full_fwd, dO, {}); }, warmup, reps,
                  cpu_clock);
    if (tty) std::cout << "\r" << std::string(50, ' ') << "\r";
    const auto fb = analysis::nsa_backward_flops(c, T);
    json b_nsa = record("nsa_cpu", nsa_bwd, fb.total());
    b_nsa["op"] = "backward";
    b_nsa["flop_by_branch"] = {{"phi", fb.phi}, {"cmp", fb.cmp}, {"slc", fb.slc}, {"win", fb.win}};
    b_nsa["forward_ms"] = nsa_ms;
    b_nsa["backward_over_forward"] = nsa_bwd / nsa_ms;
    b_nsa["baseline_ms"] = full_bwd;
    b_nsa["speedup_vs_full"] = full_bwd / nsa_bwd;
    json b_full = record("full_cpu", full_bwd, analysis::full_backward_flops(c, T));
    b_full["op"] = "backward";
    b_full["forward_ms"] = full_ms;
    b_full["backward_over_forward"] = full_bwd / full_ms;
    run.add(b_nsa);
    run.add(b_full);
    for (const json* r : {static_cast<const json*>(&b_nsa), static_cast<const json*>(&b_full)})
      std::cout << "backward " << std::left << std::setw(8) << (*r)["impl"].get<std::string>() << std::right
                << " T=" << std::setw(6) << T << " " << dtype << "  median " << std::fixed << std::setprecision(1)
                << std::setw(9) << (*r)["ms"].get<double>() << " ms (" << reps << " reps)  " << std::setprecision(1)
                << std::setw(7) << (*r)["gflops"].get<double>() << " GFLOP/s = " << std::setprecision(0)
                << std::setw(3) << (*r)["pct_of_ceiling"].get<double>() << "% of " << ceiling << "  "
                << std::setprecision(2) << (*r)["backward_over_forward"].get<double>() << "x its forward"
                << (r == &b_nsa ? cat(std::setprecision(2), std::fixed, ", ", full_bwd / nsa_bwd, "x faster than full")
                                : std::string(" (baseline)"))
                << "\n"
                << std::defaultfloat;
  }
}

#ifdef NSA_WITH_CUDA
// The card's measured ceilings at this precision, and the device's record of the results file.
cuda::Ceilings measure_device(cuda::Precision prec, json& device) {
  const cuda::Ceilings ceil = cuda::measure_ceilings(prec);
  device = {{"name", cuda::device_name()},
            {"ceilings",
             {{"matmul_tflops", ceil.matmul_tflops}, {"copy_tbps", ceil.copy_tbps}, {"l2_read_tbps", ceil.l2_read_tbps}}}};
  return ceil;
}

// The useful FLOPs of a timed stage: its branch's in f (the forward's or the backward's), by the
// label's first stage (docs/cuda.md, "Stages and files"); 0 for work no branch counts as useful
// (topn's second q.k, the backward's lists and sums, the gates).
double stage_flops(const std::string& label, const analysis::ForwardFlops& f) {
  if (label.find('.') != std::string::npos) return 0.0;
  std::string st = label.substr(0, label.find('+'));
  if (st.size() > 4 && st.compare(st.size() - 4, 4, "_bwd") == 0) st.resize(st.size() - 4);
  if (st == "phi") return f.phi;
  if (st == "cmp_attn") return f.cmp;
  if (st == "slc_attn") return f.slc;
  if (st == "win_attn") return f.win;
  return 0.0;
}

// One timed run's stages as records ({stage, ms, gflop, tflops}, and pct_of_ceiling when a matrix
// rate is given) and as text appended to `line`; `extra` may add to a stage's record and text.
using StageExtra = std::function<void(const cuda::StageTime&, double, json&, std::ostringstream&)>;
json stage_records(const std::vector<cuda::StageTime>& stages, const analysis::ForwardFlops& f, double ceiling_tflops,
                   std::ostringstream& line, const StageExtra& extra = {}) {
  json out = json::array();
  line << std::fixed;
  for (const auto& st : stages) {
    const double fl = stage_flops(st.stage, f);
    json sj{{"stage", st.stage}, {"ms", st.ms}, {"gflop", fl / 1e9}, {"tflops", fl / st.ms / 1e9}};
    if (ceiling_tflops > 0) sj["pct_of_ceiling"] = 100 * fl / st.ms / 1e9 / ceiling_tflops;
    line << "  " << st.stage << " " << std::setprecision(2) << st.ms << " ms";
    if (fl > 0) line << " (" << std::setprecision(0) << fl / st.ms / 1e9 << " TF)";
    if (extra) extra(st, fl, sj, line);
    out.push_back(sj);
  }
  return out;
}

// --device cuda: the forward pass on device-resident random inputs (Plan::randomize: q, k, v ~
// N(0, 1), shared K/V, random gates and phi), medians of cuda::bench (L2 flushed before every
// repeat), the per-stage breakdown, and useful TFLOP/s against the card's measured matrix rate.
// Full attention on the GPU is PyTorch's SDPA, timed by experiments/sdpa_baseline.py in the same
// device call (scripts/device.sh).
//
// With backward: also forward + backward (op "forward_backward") in both backward modes, on a
// second plan holding the gradients (dL/do ~ N(0, 1) on the device): the median of forward +
// backward together, of the backward alone, and the backward's per-stage medians.
void bench_cuda(const Config& base, const std::vector<int64_t>& Ts, int warmup, int reps, const cuda::Options& opts,
                bool backward, BenchRun& run, json& device) {
  const cuda::Precision prec = opts.dtype;
  const cuda::Ceilings ceil = measure_device(prec, device);
  const std::string dtype = cuda::to_string(prec);
  std::cout << "device: " << cuda::device_name() << "; measured ceilings: " << dtype << " matrix product "
            << std::fixed << std::setprecision(0) << ceil.matmul_tflops << " TFLOP/s, copy " << std::setprecision(2)
            << ceil.copy_tbps << " TB/s, L2 reads " << ceil.l2_read_tbps << " TB/s\n"
            << std::defaultfloat;
  for (int64_t T : Ts) {
    cuda::Options opt = opts;
    opt.intermediates = false;  // what a model needs: o (block lists and branch outputs stay internal)
    cuda::BenchResult res;
    {
      cuda::Plan plan(base, T, {}, opt);
      plan.randomize(1000 + uint64_t(T));
      res = cuda::bench(plan, warmup, reps);
    }
    const auto f = analysis::nsa_forward_flops(base, T);
    const double tflops = f.total() / res.ms / 1e9;
    std::ostringstream line;
    const json stages = stage_records(res.stages, f, ceil.matmul_tflops, line,
                                      [&](const cuda::StageTime& st, double fl, json& sj, std::ostringstream& text) {
      if (st.stage != "slc_attn") return;
      // Each (position, group) reads its selected tokens' K and V once: the useful FLOPs over G,
      // scaled by the element size (2 FLOPs per key element per head, 2 bytes per element).
      const double kv_bytes = fl / double(base.G()) * cuda::element_size(prec) / 2;
      sj["kv_gbytes"] = kv_bytes / 1e9;
      sj["kv_tbps"] = kv_bytes / st.ms / 1e9;
      sj["pct_of_l2_read"] = 100 * kv_bytes / st.ms / 1e9 / ceil.l2_read_tbps;
      text << " [" << std::setprecision(1) << kv_bytes / st.ms / 1e9 << " TB/s K/V]";
    });
    // The traffic model's roofline prediction (analysis/traffic.hpp) at this call's measured
    // ceilings: each branch's kernels at max(FLOPs / matrix rate, bytes / copy rate), summed.
    const analysis::Device measured{"measured", ceil.matmul_tflops * 1e12, ceil.copy_tbps * 1e12};
    const analysis::Traffic tm = analysis::prefill_traffic(base, T, 1, int(cuda::element_size(prec)));
    const double model_ms = tm.nsa_ms(measured), full_model_ms = tm.full_ms(measured);
    line << "  | model " << std::setprecision(2) << model_ms << " ms (full " << full_model_ms << ")";
    json r{{"op", "forward"}, {"impl", "nsa_cuda"}, {"T", T}, {"B", 1}, {"Hq", base.Hq}, {"Hkv", base.Hkv},
           {"dk", base.dk}, {"dv", base.dv}, {"dtype", dtype}, {"ms", res.ms}, {"gflop", f.total() / 1e9},
           {"gflops", tflops * 1e3}, {"tflops", tflops}, {"ceiling_tflops", ceil.matmul_tflops},
           {"pct_of_ceiling", 100 * tflops / ceil.matmul_tflops}, {"kernels", kernels_json(res.kernels)},
           {"reps", reps}, {"warmup", warmup}, {"l2_flushed", true}, {"stages", stages},
           {"model_ms", model_ms}, {"full_model_ms", full_model_ms}, {"model_gbytes", tm.nsa().bytes / 1e9},
           {"flop_by_branch", {{"phi", f.phi}, {"cmp", f.cmp}, {"slc", f.slc}, {"win", f.win}}},
           {"config", config_json(base)}};
    run.add(r);
    std::cout << "forward nsa_cuda T=" << std::setw(6) << T << " " << dtype << " dk=" << base.dk << " dv=" << base.dv
              << "  median " << std::fixed << std::setprecision(3) << std::setw(8) << res.ms
              << " ms (" << reps << " reps, L2 flushed)  " << std::setprecision(0) << std::setw(4) << tflops
              << " TFLOP/s = " << std::setw(2) << 100 * tflops / ceil.matmul_tflops << "% of "
              << ceil.matmul_tflops << "  |" << line.str() << "\n"
              << std::defaultfloat;
    if (!backward) continue;

    opt.backward = true;
    cuda::Plan plan(base, T, {}, opt);
    plan.randomize(1000 + uint64_t(T));
    plan.randomize_grad(2000 + uint64_t(T));
    const auto fb = analysis::nsa_backward_flops(base, T);
    const double flop = f.total() + fb.total();
    for (bool det : {false, true}) {
      plan.set_deterministic(det);
      const cuda::BwdBenchResult br = cuda::bench_backward(plan, warmup, reps);
      std::ostringstream bl;
      const json bstages = stage_records(br.stages, fb, 0, bl);
      const double tf = flop / br.fwd_bwd_ms / 1e9;
      json rb{{"op", "forward_backward"}, {"impl", det ? "nsa_cuda_deterministic" : "nsa_cuda"}, {"T", T}, {"B", 1},
              {"Hq", base.Hq}, {"Hkv", base.Hkv}, {"dk", base.dk}, {"dv", base.dv}, {"dtype", dtype},
              {"ms", br.fwd_bwd_ms}, {"forward_ms", res.ms}, {"backward_ms", br.bwd_ms},
              {"backward_over_forward", br.bwd_ms / res.ms}, {"gflop", flop / 1e9}, {"gflops", tf * 1e3},
              {"tflops", tf}, {"ceiling_tflops", ceil.matmul_tflops},
              {"pct_of_ceiling", 100 * tf / ceil.matmul_tflops}, {"kernels", kernels_json(br.kernels)},
              {"deterministic", det}, {"reps", reps}, {"warmup", warmup},
              {"l2_flushed", true}, {"backward_stages", bstages},
              {"backward_flop_by_branch", {{"phi", fb.phi}, {"cmp", fb.cmp}, {"slc", fb.slc}, {"win", fb.win}}},
              {"config", config_json(base)}};
      run.add(rb);
      std::cout << "forward_backward nsa_cuda T=" << std::setw(6) << T << " " << dtype << " dk=" << base.dk
                << " dv=" << base.dv << " backward=" << cuda::to_string(br.kernels.backward.variant)
                << (det ? " deterministic" : " fast") << "  median " << std::fixed << std::setprecision(3)
                << br.fwd_bwd_ms << " ms (backward " << br.bwd_ms << " ms = " << std::setprecision(2)
                << br.bwd_ms / res.ms << "x forward)  " << std::setprecision(0) << tf << " TFLOP/s  |" << bl.str()
                << "\n"
                << std::defaultfloat;
    }
  }
}

// --ops decode: the latency of one decode step (cuda::bench_decode) for each cache length s
// (--T: tokens held before the step) and batch (--batch), against the bytes the step must read
// (the traffic model of reference/decode.hpp: ref::step_tokens at the cache length s + 1 that
// the step attends over, times Hkv (dk + dv) element bytes, per sequence; phi's parameters once
// per step, shared by the batch) and the card's measured copy bandwidth. PyTorch SDPA decode is
// timed by experiments/sdpa_baseline.py --decode in the same device call.
void bench_cuda_decode(const Config& base, const std::vector<int64_t>& Ts, const std::vector<int64_t>& batches,
                       int warmup, int reps, const cuda::Options& opts, BenchRun& run, json& device) {
  const cuda::Precision prec = opts.dtype;
  const cuda::Ceilings ceil = measure_device(prec, device);
  const std::string dtype = cuda::to_string(prec);
  const int elem = cuda::element_size(prec);
  std::cout << "device: " << cuda::device_name() << "; measured ceilings: copy " << std::fixed << std::setprecision(2)
            << ceil.copy_tbps << " TB/s, L2 reads " << ceil.l2_read_tbps << " TB/s\n"
            << std::defaultfloat;
  for (int64_t T : Ts)
    for (int64_t B : batches) {
      const cuda::DecodeBench r = cuda::bench_decode(base, B, T, opts, warmup, reps, 1000 + uint64_t(T));
      // Bytes the step must read for B sequences (the model); phi's parameters once per step.
      auto model = [&](int64_t pos) {
        const ref::StepBytes b = ref::step_bytes(base, ref::step_tokens(base, pos + 1), elem);
        return std::pair<double, ref::StepBytes>{double(B) * (b.cmp + b.slc + b.win + b.emit) + b.phi, b};
      };
      const auto [bytes, sb] = model(r.pos);
      const auto [bytes_emit, sbe] = model(r.pos_emit);
      const double d = double(base.cmp_stride);
      const double ms_mean = ((d - 1) * r.step.ms + r.emit.ms) / d;  // one step in d emits
      const double bytes_mean = ((d - 1) * bytes + bytes_emit) / d;
      const double full_bytes = double(B) * sb.full;
      auto stages_json = [](const cuda::DecodeTiming& t) {
        json a = json::array();
        for (const auto& st : t.stages) a.push_back({{"stage", st.stage}, {"ms", st.ms}});
        return a;
      };
      auto splits_json = [](const cuda::DecodeTiming& t) {
        return json{{"cmp", {t.splits_cmp, t.keys_cmp}}, {"win", {t.splits_win, t.keys_win}}, {"slc", {t.splits_slc, t.keys_slc}}};
      };
      const double tbps = bytes / r.step.ms / 1e9;
      json rec{{"op", "decode"}, {"impl", "nsa_cuda"}, {"T", T}, {"kv_len", T + 1}, {"B", B}, {"Hq", base.Hq},
               {"Hkv", base.Hkv}, {"dk", base.dk}, {"dv", base.dv}, {"dtype", dtype}, {"ms", r.step.ms},
               {"ms_emit", r.emit.ms}, {"ms_mean", ms_mean}, {"ms_eager", r.step.ms_eager}, {"ms_graph", r.step.ms_graph},
               {"ms_emit_eager", r.emit.ms_eager}, {"ms_emit_graph", r.emit.ms_graph},
               {"timing", r.step.ms_graph > 0 ? "cuda_graph" : "eager"}, {"pdl", r.step.pdl},
               {"l2_evict_first", r.step.evict_first}, {"kernel", r.step.kernel},
               {"pos", r.pos},
               {"pos_emit", r.pos_emit},
               {"bytes", bytes}, {"bytes_emit", bytes_emit}, {"bytes_mean", bytes_mean},
               {"bytes_by_branch_per_seq", {{"cmp", sb.cmp}, {"slc", sb.slc}, {"win", sb.win}, {"emit", sbe.emit},
                                            {"phi_params_per_step", sbe.phi}}},
               {"tbps", tbps}, {"tbps_mean", bytes_mean / ms_mean / 1e9}, {"copy_tbps", ceil.copy_tbps},
               {"pct_of_copy", 100 * tbps / ceil.copy_tbps},
               {"model_ms_at_copy", bytes / ceil.copy_tbps / 1e9}, {"model_ms_mean_at_copy", bytes_mean / ceil.copy_tbps / 1e9},
               {"full_bytes", full_bytes}, {"full_model_ms_at_copy", full_bytes / ceil.copy_tbps / 1e9},
               {"stages", stages_json(r.step)}, {"stages_emit", stages_json(r.emit)}, {"splits", splits_json(r.step)},
               {"splits_slc_emit", splits_json(r.emit)}, {"device_bytes", r.device_bytes}, {"reps", reps},
               {"warmup", warmup}, {"l2_flushed", true}, {"config", config_json(base)}};
      run.records.push_back(rec);
      run.csv << "decode,nsa_cuda," << T << "," << dtype << "," << r.step.ms << ",,," << 100 * tbps / ceil.copy_tbps
              << ",\n";
      std::ostringstream st;
      st << std::fixed << std::setprecision(1);
      for (const auto& x : r.step.stages) st << " " << x.stage << " " << 1e3 * x.ms << "us";
      std::cout << "decode nsa_cuda v" << r.step.kernel << " s=" << std::setw(6) << T << " B=" << std::setw(2) << B << " "
                << dtype << "  median "
                << std::fixed << std::setprecision(1) << std::setw(7) << 1e3 * r.step.ms << " us (graph "
                << 1e3 * r.step.ms_graph << ", eager " << 1e3 * r.step.ms_eager << "; emitting step "
                << 1e3 * r.emit.ms << " us, mean " << 1e3 * ms_mean << " us)  " << std::setprecision(1) << bytes / 1e6
                << " MB -> " << std::setprecision(2) << tbps << " TB/s = " << std::setprecision(0)
                << 100 * tbps / ceil.copy_tbps << "% of copy (model at copy " << std::setprecision(1)
                << 1e6 * bytes / ceil.copy_tbps / 1e12 << " us) |" << st.str() << "\n"
                << std::defaultfloat;
    }
}
#endif

}  // namespace

int cmd_bench(const Args& args) {
  Command cmd("bench",
              "Time the NSA forward and backward passes against full attention's on random inputs (medians\n"
              "after warm-up; each backward also against its own forward), with the machine's measured\n"
              "matrix-product rate as the ceiling. Writes bench.json, bench.csv.");
  po::options_description o("Benchmark");
  o.add_options()("T", po::value<std::string>()->default_value("4096,8192,16384"), "sequence lengths, comma-separated")(
      "Hq", po::value<int64_t>()->default_value(16), "query heads")(
      "Hkv", po::value<int64_t>()->default_value(1), "key/value heads")(
      "dk", po::value<int64_t>()->default_value(64), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(64), "value head dim")(
      "precisions", po::value<std::string>()->default_value("float,double"), "CPU arithmetic, comma-separated")(
      "warmup", po::value<int>()->default_value(1), "untimed runs first")(
      "reps", po::value<int>()->default_value(3), "timed runs; the median is reported")(
      "clock", po::value<std::string>()->default_value("wall"),
      "wall, or cpu: the process's CPU time (with --threads 1, robust on a machine shared with other jobs)")(
      "ops", po::value<std::string>()->default_value("forward,backward"),
      "forward, or forward,backward: also the backward passes (given dL/do), each against its forward; or "
      "decode (--device cuda): one decode step at cache lengths --T for each --batch")(
      "batch", po::value<std::string>()->default_value("1,16,64"), "decode: sequences per step, comma-separated");
  cmd.add(o);
  cmd.add(nsa_options());
  po::options_description r("Run");
  r.add_options()("device", po::value<std::string>()->default_value("cpu"), "cpu or cuda")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)")(
      "dtype", po::value<std::string>()->default_value("bf16"), "CUDA operands: bf16, fp16 or fp32");
  cmd.add(r);
  cmd.add(variant_options());
  cmd.add(bwd_variant_options());
  cmd.add(decode_kernel_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const bool on_cuda = use_cuda_device(vm, "bench");
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
  const auto ops = parse_list<std::string>(vm["ops"].as<std::string>(), "ops");
  const bool backward = std::find(ops.begin(), ops.end(), "backward") != ops.end();
  const bool decode = std::find(ops.begin(), ops.end(), "decode") != ops.end();
  for (const auto& op : ops)
    if (op != "forward" && op != "backward" && op != "decode")
      throw ConfigError(cat("ops: '", op, "' is not one of: forward, backward, decode"));
  if (decode && (ops.size() != 1 || !on_cuda))
    throw ConfigError("ops: decode is timed alone (--ops decode) and on the GPU (--device cuda)");
  if (!decode && std::find(ops.begin(), ops.end(), "forward") == ops.end())
    throw ConfigError("ops: backward is timed against its forward pass; list both (--ops forward,backward)");
  const auto batches = parse_list<int64_t>(vm["batch"].as<std::string>(), "batch");
  for (int64_t B : batches)
    if (B < 1) throw ConfigError(cat("batch = ", B, " is invalid: expected >= 1"));
  const std::string clock = vm["clock"].as<std::string>();
  if (clock != "wall" && clock != "cpu") throw ConfigError(cat("clock = '", clock, "' is not one of: wall, cpu"));
  const bool cpu_clock = clock == "cpu";
  // On the GPU a run takes milliseconds: more repeats unless asked otherwise.
  const int warmup = on_cuda && vm["warmup"].defaulted() ? 3 : vm["warmup"].as<int>();
  const int reps = on_cuda && vm["reps"].defaulted() ? 20 : vm["reps"].as<int>();
  if (reps < 1 || warmup < 0) throw ConfigError(cat("reps = ", reps, ", warmup = ", warmup, ": expected reps >= 1, warmup >= 0"));
  // Inputs and phi's parameters are drawn from seeds of their own: these would be silently ignored.
  if (vm.count("compress-params")) throw UsageError("bench draws phi's parameters; --compress-params is not used");
  if (!vm["seed"].defaulted()) throw UsageError("bench draws its inputs from fixed seeds; --seed is not used");
  const int threads = apply_run_options(vm);
  // The largest case, before any is run: its inputs and phi's parameters, and the larger of the
  // NSA forward pass and full attention (each result is freed before the next run), and the
  // matrices of the ceiling measurement. On the CPU only: --device cuda holds its inputs and
  // results on the device (the Plan refuses what does not fit there).
  for (const auto& p : on_cuda ? std::vector<std::string>{} : precisions)
    for (int64_t T : Ts) {
      const int elem = p == "float" ? 4 : 8;
      const double inputs =
          double(T) * (double(base.Hq) * double(base.dk) + double(base.Hkv) * double(base.dk + base.dv)) +
          ref::compress_param_count(base);
      const ref::MemoryUse f = ref::forward_memory(base, {T}, 0, elem, threads, ref::Path::Fast);
      const ref::MemoryUse a = ref::full_attention_memory(base, {T}, elem, threads, ref::Path::Fast);
      MemoryBudget budget;
      budget.add(cat("inputs at T = ", T, " in ", p), elem * inputs);
      budget.add("the larger run's outputs and working memory", std::max(f.result + f.working, a.result + a.working));
      budget.add("ceiling matrices", 3.0 * 512 * 512 * elem * threads);
      budget.require();
    }
  OutputDir out(vm["out"].as<std::string>());
  BenchRun run;
  run.csv << "op,impl,T,dtype,ms,gflop,gflops,pct_of_ceiling,speedup_vs_full\n";
  std::string command = "nsa bench";
  for (const auto& a : args) command += " " + a;
  if (on_cuda) {
#ifdef NSA_WITH_CUDA
    json device;
    const cuda::Options opts = cuda_options(vm);
    if (decode)
      bench_cuda_decode(base, Ts, batches, warmup, reps, opts, run, device);
    else
      bench_cuda(base, Ts, warmup, reps, opts, backward, run, device);
    json j{{"device", device["name"]}, {"date", today()}, {"command", command}, {"config", config_json(base)},
           {"ceilings", device["ceilings"]}, {"records", run.records}};
    out.add_text("bench.csv", run.csv.str());
    out.add_text("bench.json", j.dump(2) + "\n");
    out.commit();
    std::cout << "bench: wrote " << out.dir() << "/bench.json and bench.csv\n";
#endif
    return 0;
  }
  json ceilings = json::object();
  std::cout << "bench: " << cpu_name() << ", " << threads << " threads, " << clock << " clock; Hq=" << base.Hq << " Hkv=" << base.Hkv
            << " dk=" << base.dk << " dv=" << base.dv << " l=" << base.cmp_len << " d=" << base.cmp_stride
            << " l'=" << base.slc_len << " n=" << base.slc_count << " w=" << base.window << "\n";
  for (const auto& p : precisions) {
    const std::string dtype = p == "float" ? "fp32" : "fp64";
    const double ceiling =
        p == "float" ? ref::measure_gemm_gflops<float>(512, 0.3, cpu_clock) : ref::measure_gemm_gflops<double>(512, 0.3, cpu_clock);
    ceilings[dtype] = ceiling;
    std::cout << "ceiling: Eigen " << p << " matrix product 512^3 per thread (" << clock << " clock): " << std::fixed << std::setprecision(1)
              << ceiling << " GFLOP/s\n"
              << std::defaultfloat;
    if (p == "float")
      bench_precision<float>(base, Ts, warmup, reps, ceiling, dtype, backward, cpu_clock, run);
    else
      bench_precision<double>(base, Ts, warmup, reps, ceiling, dtype, backward, cpu_clock, run);
  }
  json j{{"device", cat("cpu: ", cpu_name(), " x ", threads, " threads")},
         {"date", today()},
         {"clock", clock},
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
