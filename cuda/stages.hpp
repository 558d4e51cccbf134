// NSA's six stages and the variants of their kernels: the names shared by the CUDA path, the
// command line (--variant, --warps), the timing labels and the results files (docs/cuda.md,
// "Kernel choice"). Header-only and free of CUDA, so that every build checks the options.
#pragma once

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "errors.hpp"

namespace nsa::cuda {

// The stages in the order of the forward pass: phi (Eq. 7), the compression attention, the top-n
// (Eq. 8-11: probabilities, the overlap mapping, group sums, top-n), the selection attention
// (Eq. 12), the window attention, the gates and the gated sum (Eq. 5).
enum class Stage { Phi, CmpAttn, Topn, SlcAttn, WinAttn, Combine };
constexpr int kStages = 6;

// The kernel a stage runs. Fp32: CUDA cores, fp32 arithmetic on operands of any precision, any
// shape (dk, dv <= 256): the obviously-right kernels and the --dtype fp32 debug mode. Mma: tensor
// cores (mma.sync m16n8k16, sm_80 and newer, bf16/fp16 operands, fp32 accumulation) for G in
// {1, 2, 4, 8, 16} and the head dims of NSA_CUDA_DIMS. Wgmma: Hopper's own instructions (wgmma, TMA,
// a producer warp and two consumer warpgroups; sm_90a builds on compute capability 9.0; cmp_attn
// and win_attn+combine, docs/cuda_sm90.md). Cublas: phi's block products (linear, mlp; mean is one
// kernel). Auto: choose_kernels decides. A new kernel of a stage (a Hopper
// wgmma one, say) is one more value here and one branch in choose_kernels (cuda/choice.cu).
enum class Variant { Auto, Fp32, Mma, Cublas, Wgmma };
constexpr int kVariants = 5;

using StageVariants = std::array<Variant, kStages>;  // index: int(Stage)
using StageWarps = std::array<int, kStages>;         // warps per CTA of a stage's kernel; 0: chosen

inline const char* to_string(Stage s) {
  static const char* names[kStages] = {"phi", "cmp_attn", "topn", "slc_attn", "win_attn", "combine"};
  return names[int(s)];
}

inline Stage parse_stage(const std::string& s) {
  for (int i = 0; i < kStages; ++i)
    if (s == to_string(Stage(i))) return Stage(i);
  throw ConfigError(cat("stage = '", s, "' is not one of: phi, cmp_attn, topn, slc_attn, win_attn, combine"));
}

inline const char* to_string(Variant v) {
  static const char* names[kVariants] = {"auto", "fp32", "mma", "cublas", "wgmma"};
  return names[int(v)];
}

inline Variant parse_variant(const std::string& s) {
  for (int i = 0; i < kVariants; ++i)
    if (s == to_string(Variant(i))) return Variant(i);
  throw ConfigError(cat("variant = '", s, "' is not one of: auto, fp32, mma, cublas, wgmma"));
}

// Every stage but phi (which has one variant) to v.
inline void set_variant(StageVariants& variants, Variant v) {
  for (int i = 0; i < kStages; ++i) variants[size_t(i)] = Stage(i) == Stage::Phi ? Variant::Auto : v;
}

namespace detail {
// "a=b,c=d" -> {{"a", "b"}, {"c", "d"}}; what and form name the option in the message.
inline std::vector<std::pair<std::string, std::string>> stage_items(const std::string& spec, const char* what,
                                                                   const char* form) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t i = 0;
  while (i <= spec.size()) {
    const size_t j = std::min(spec.find(',', i), spec.size());
    const std::string item = spec.substr(i, j - i);
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == item.size())
      throw ConfigError(cat(what, " = '", spec, "': item '", item, "' is not ", form));
    out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    i = j + 1;
  }
  return out;
}
}  // namespace detail

// --variant: "auto", "fp32" or "mma" for every stage but phi, or "STAGE=VARIANT,..." (e.g.
// "cmp_attn=fp32,slc_attn=mma", "cmp_attn=wgmma"): sets the named stages.
inline void parse_variants(const std::string& spec, StageVariants& variants) {
  if (spec == "auto" || spec == "fp32" || spec == "mma") {
    set_variant(variants, parse_variant(spec));
    return;
  }
  for (const auto& [stage, v] :
       detail::stage_items(spec, "variant", "STAGE=VARIANT (or one of auto, fp32, mma for every stage)"))
    variants[size_t(parse_stage(stage))] = parse_variant(v);
}

// --warps: "STAGE=N,..." with N in 0..8 (0: chosen).
inline void parse_warps(const std::string& spec, StageWarps& warps) {
  if (spec.empty()) return;
  for (const auto& [stage, n] : detail::stage_items(spec, "warps", "STAGE=N")) {
    char* end = nullptr;
    const long w = std::strtol(n.c_str(), &end, 10);
    if (!end || *end != '\0' || w < 0 || w > 8)
      throw ConfigError(cat("warps = '", spec, "': item '", stage, "=", n, "' is not STAGE=N with N in 0..8"));
    warps[size_t(parse_stage(stage))] = int(w);
  }
}

}  // namespace nsa::cuda
