// Memory traffic and roofline model: the tokens, bytes and FLOPs each NSA branch and full
// attention move, for one decode step and for a prefill (forward) pass, from the config, the
// dtype, the batch and the GQA layout (docs/analysis.md). Eigen-free: the CUDA benchmarks include
// it to print the model's prediction beside each measurement.
//
// Units. `tokens`: K/V rows one KV head reads per sequence (the paper's count), summed over the
// query positions for prefill; per-head loading multiplies it by G. `bytes`: HBM bytes of the
// whole batch. `flops`: useful FLOPs of the whole batch (analysis/cost.hpp: 2*(dk+dv) per visited
// key and query head; softmax not counted).
//
// Kernel-design variants (Loading): group-centric kernels (the paper's selection kernel, FA2 with
// GQA packing) load each K/V row once for the G query heads of its group; per-head kernels load
// it once per query head, G times the K/V bytes for the same FLOPs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config.hpp"

namespace nsa::analysis {

// How decode tokens are counted (docs/spec.md 8-9).
//   Paper: floor(s/d) compressed + n*l' selected + w window, against s for full attention: the
//          counting that reproduces the paper's Table 4 (2048, 2560, 3584, 5632 tokens at 8k..64k)
//          and its expected speedups 4.0/6.4/9.1/11.6x. K/V bytes only.
//   Exact: what our kernels read at cache length s (the query at t = s-1 attends to s tokens):
//          Nc(s) compressed rows, the selected blocks' tokens u <= t (analysis::slc_tokens),
//          min(w, s) window rows, and phi's raw rows for emitting a compressed block, l every d
//          steps (l/d per step, amortised); plus each branch kernel's q read and o write and phi's
//          parameters (amortised over d steps).
enum class Convention { Paper, Exact };
enum class Loading { GroupCentric, PerHead };
const char* to_string(Convention c);
const char* to_string(Loading l);
Convention parse_convention(const std::string& s);  // "paper", "exact"
Loading parse_loading(const std::string& s);        // "group", "head"

// A device for roofline predictions: peak FLOP/s of the attention dtype and HBM bandwidth.
struct Device {
  std::string name;
  double flops_per_s = 0;
  double bytes_per_s = 0;
};
// Presets (dense 16-bit tensor-core peak, HBM bandwidth):
//   h100          H100 SXM5 80GB data sheet: 989.4 TFLOP/s, 3.35 TB/s;
//   a100          A100 SXM4 80GB data sheet: 312 TFLOP/s, 2.039 TB/s;
//   h100-measured ceilings measured on our H100 (docs/spec.md 10): 800 TFLOP/s, 3.0 TB/s.
Device device_preset(const std::string& name);  // throws ConfigError naming the presets
std::vector<std::string> device_presets();

// The roofline time: max(flops / peak, bytes / bandwidth), in ms.
double roofline_ms(double flops, double bytes, const Device& dev);

struct BranchTraffic {
  double tokens = 0;
  double bytes = 0;
  double flops = 0;
  double intensity() const { return bytes > 0 ? flops / bytes : 0; }  // FLOP per byte
  BranchTraffic& operator+=(const BranchTraffic& o);
};

struct Traffic {
  BranchTraffic phi;   // compressing blocks (Eq. 7); 0 under Convention::Paper
  BranchTraffic cmp;   // attention over the compressed keys
  BranchTraffic slc;   // attention over the selected blocks
  BranchTraffic win;   // attention over the window
  BranchTraffic full;  // full causal attention, the baseline
  BranchTraffic nsa() const;  // phi + cmp + slc + win
  // full.tokens / nsa().tokens: the paper's "expected speedup" of memory access.
  double expected_speedup() const;
  // Separate kernels per branch: the sum of each branch's roofline time.
  double nsa_ms(const Device& dev) const;
  double full_ms(const Device& dev) const;
};

struct TrafficOptions {
  Loading loading = Loading::GroupCentric;
  int64_t q_tile = 64;  // prefill: query positions per tile of the full, cmp and window kernels
};

// One decode step of `batch` sequences at cache length `context` (the new token included).
Traffic decode_traffic(const Config& cfg, int64_t context, int64_t batch, int dtype_bytes,
                       Convention conv = Convention::Exact, const TrafficOptions& opt = {});

// A prefill (forward) pass over `batch` sequences of T tokens, counted exactly: tiles of q_tile
// positions read the keys their last row sees (full: [0, t1); cmp: the compressed rows visible at
// t1 - 1; window: [max(0, t0-w+1), t1)); the selection kernel is the paper's, one position per
// program, reading that position's selected tokens; phi reads each block's l raw rows once and
// writes its compressed row. Every attention kernel reads q and writes o once.
Traffic prefill_traffic(const Config& cfg, int64_t T, int64_t batch, int dtype_bytes, const TrafficOptions& opt = {});

}  // namespace nsa::analysis
