// `nsa decode`: a workload token by token through the KV cache (docs/spec.md 8, reference/decode.hpp).
// Writes the same per-position files as `nsa forward`: positions < --prefill come from the
// prefill (the forward pass on each sequence's prompt, which also fills the cache), the others
// from decode steps, all sequences that still have tokens stepping together as one batch. Beside
// them: config.json with the cache size and the bytes read per step, and decode_steps.csv with
// one row per step and sequence.
#include <chrono>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "decode.hpp"
#ifdef NSA_WITH_CUDA
#include "nsa_cuda.hpp"
#endif

namespace nsa::cli {

namespace {

json bytes_json(const ref::CacheBytes& c) {
  return {{"cmp", c.cmp}, {"tail", c.tail}, {"slc", c.slc}, {"win", c.win}, {"total", c.total()}, {"full_attention", c.full}};
}

// Two ratios: against the spec's count (the three branches' keys/values, docs/spec.md 8), and
// against everything the step read (the emission of a compressed row included: phi's raw rows
// and parameters, which dominate at small sizes).
json bytes_json(const ref::StepBytes& b) {
  const double attended = b.cmp + b.slc + b.win;
  return {{"cmp", b.cmp},
          {"slc", b.slc},
          {"win", b.win},
          {"emit", b.emit},
          {"phi_params", b.phi},
          {"total", b.total()},
          {"full_attention", b.full},
          {"full_over_branches", attended > 0 ? b.full / attended : 0.0},
          {"full_over_total", b.total() > 0 ? b.full / b.total() : 0.0}};
}

json tokens_json(const ref::StepTokens& t) {
  return {{"cmp", t.cmp}, {"slc", t.slc}, {"win", t.win}, {"emit", t.emit}, {"attended", t.attended()}, {"full", t.full}};
}

// The traffic of the run: every step's tokens and bytes in decode_steps.csv, and in config.json
// the cache at the end, the mean bytes a step read, and the model at the longest sequence's length.
// Bytes count `elem` bytes per element: the run's arithmetic (8, 4) or the device's precision (2).
template <class S>
json decode_report(const Workload& w, const ref::DecodeRun<S>& run, int64_t prefill, int elem, std::string& csv) {
  const Config& cfg = w.cfg;
  std::ostringstream os;
  os << "seq,pos,cache_len,cmp_tokens,slc_tokens,win_tokens,emit_tokens,full_tokens,bytes_read,full_bytes_read\n";
  ref::StepBytes mean;
  for (const auto& st : run.steps) {
    const ref::StepBytes b = ref::step_bytes(cfg, st.tokens, elem);
    os << st.seq << ',' << st.pos << ',' << st.pos + 1 << ',' << st.tokens.cmp << ',' << st.tokens.slc << ','
       << st.tokens.win << ',' << st.tokens.emit << ',' << st.tokens.full << ',' << b.total() << ',' << b.full << '\n';
    mean.cmp += b.cmp, mean.slc += b.slc, mean.win += b.win, mean.emit += b.emit, mean.phi += b.phi, mean.full += b.full;
  }
  csv = os.str();
  ref::CacheBytes cache;
  int64_t Tmax = 0;
  for (int64_t T : w.seqlens) {
    const ref::CacheBytes c = ref::cache_bytes(cfg, run.cache.share, T, elem);
    cache.cmp += c.cmp, cache.tail += c.tail, cache.slc += c.slc, cache.win += c.win, cache.full += c.full;
    Tmax = std::max(Tmax, T);
  }
  double allocated = 0;
  for (const auto* t : {&run.cache.k_cmp, &run.cache.v_cmp, &run.cache.k_tail, &run.cache.v_tail, &run.cache.k_slc,
                        &run.cache.v_slc, &run.cache.k_win, &run.cache.v_win})
    allocated += double(t->numel()) * elem;
  const auto& sh = run.cache.share;
  json j = {{"prefill", prefill},
            {"steps", run.steps.size()},
            {"elem_bytes", elem},
            {"kv_shared_with_selection", {{"cmp_k", sh.cmp_k}, {"cmp_v", sh.cmp_v}, {"win_k", sh.win_k}, {"win_v", sh.win_v}}},
            {"cache_bytes", bytes_json(cache)},
            {"cache_bytes_allocated", allocated},
            {"prefill_seconds", run.prefill_seconds},
            {"step_seconds", run.step_seconds},
            {"step_calls", run.step_calls},
            {"ms_per_step_call", run.step_calls ? 1e3 * run.step_seconds / double(run.step_calls) : 0.0}};
  if (!run.steps.empty()) {
    const double n = double(run.steps.size());
    mean.cmp /= n, mean.slc /= n, mean.win /= n, mean.emit /= n, mean.phi /= n, mean.full /= n;
    j["bytes_read_per_step_mean"] = bytes_json(mean);
  } else {
    j["bytes_read_per_step_mean"] = nullptr;
  }
  if (Tmax > 0) {
    const ref::StepTokens m = ref::step_tokens(cfg, Tmax);
    j["model_at_longest"] = {{"cache_len", Tmax}, {"tokens", tokens_json(m)}, {"bytes", bytes_json(ref::step_bytes(cfg, m, elem))}};
  }
  return j;
}

}  // namespace

int cmd_decode(const Args& args) {
  Command cmd("decode",
              "NSA decoding through a KV cache (docs/spec.md 8): the same files as `nsa forward`, positions from\n"
              "--prefill on computed one token per step from the cache; config.json reports the cache size and\n"
              "the bytes read per step, decode_steps.csv every step's traffic.");
  cmd.add(input_options());
  cmd.add(nsa_options());
  po::options_description d("Decoding");
  d.add_options()("prefill", po::value<int64_t>()->default_value(0),
                  "tokens of each sequence put into the cache by the prefill (the forward pass on the prompt) "
                  "before stepping; a sequence shorter than this is prefilled whole");
  cmd.add(d);
  cmd.add(run_options());
  cmd.add(decode_kernel_options());
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  const bool on_cuda = use_cuda_device(vm, "decode");
  const bool dbl = !on_cuda && use_double(vm);
  const ref::Path path = parse_path(vm);
  const int64_t prefill = vm["prefill"].as<int64_t>();
  if (prefill < 0) throw ConfigError(cat("prefill = ", prefill, " is invalid: expected >= 0 tokens"));
  Workload w = load_workload(vm);
  std::vector<int64_t> prefix;
  int64_t Tmax = 0;
  for (int64_t T : w.seqlens) prefix.push_back(std::min(prefill, T)), Tmax = std::max(Tmax, T);
  // The outputs (as forward's), the cache at capacity for every sequence, the prefill's outputs
  // (on the host, in float for the CUDA run: its cache is downloaded at the end).
  const int elem = dbl ? 8 : 4;
  const Config& c = w.cfg;
  const double out_bytes = double(w.in.N()) * (c.Hq * (4.0 * c.dv + 6) + c.Hkv * (c.slc_count + c.num_slc_blocks(Tmax)));
  const double cache_bytes =
      double(w.seqlens.size()) * ref::cache_bytes(c, ref::kv_sharing(w.in), Tmax, elem).total();
  require_memory(2 * out_bytes * elem + cache_bytes, "decoding");
  apply_run_options(vm);
  const bool allow_nonfinite = vm["allow-nonfinite"].as<bool>();
  OutputDir out(vm["out"].as<std::string>());
  const auto t0 = std::chrono::steady_clock::now();
  json report;
  std::string csv;
  size_t steps = 0;
  std::string arith = dbl ? "double" : "float";
  json device_json;
  auto report_run = [&](const auto& run, int bytes) {
    if (!allow_nonfinite) check_finite_outputs(run.out, w.batch, dbl);
    write_forward(w, run.out, out);
    report = decode_report(w, run, prefill, bytes, csv);
    steps = run.steps.size();
  };
  if (on_cuda) {
#ifdef NSA_WITH_CUDA
    // The prefill is the CUDA forward pass on the prompts, the steps the CUDA decode step; the
    // device rounds the inputs to --dtype and every output comes back as float32.
    const cuda::Options opt = cuda_options(vm);
    cuda::KernelChoice ran;  // what the prefill's forward pass ran (all Auto without a prefill)
    report_run(cuda::decode_workload(w.cfg, w.in.cast<float>(), prefix, opt, &ran), cuda::element_size(opt.dtype));
    arith = cat("cuda ", cuda::to_string(opt.dtype));
    const int split = opt.decode_kernel == -1 ? cuda::kDefaultDecodeKernel : opt.decode_kernel;
    device_json = {{"name", cuda::device_name()}, {"dtype", cuda::to_string(opt.dtype)},
                   {"prefill_kernels", kernels_json(ran)}, {"decode_kernel", split}, {"dec_waves", opt.dec_waves},
                   {"dec_pdl", opt.dec_pdl}, {"dec_evict_first", opt.dec_evict_first}};
#endif
  } else if (dbl) {
    report_run(ref::decode_workload(w.cfg, w.in, prefix, path), 8);
  } else {
    report_run(ref::decode_workload(w.cfg, w.in.cast<float>(), prefix, path), 4);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(w.cfg);
  j["workload"] = workload_json(w);
  j["decode"] = report;
  j["seconds"] = secs;
  if (on_cuda) j["cuda"] = device_json;
  out.add_text("decode_steps.csv", csv);
  out.add_text("config.json", j.dump(2) + "\n");
  out.commit();
  std::cout << "decode: " << w.in.N() << " tokens in " << w.seqlens.size() << " sequence(s), prefill " << prefill
            << ", " << steps << " decode steps, " << arith << ", " << secs << " s -> "
            << out.dir() << "\n";
  return 0;
}

}  // namespace nsa::cli
