// The kernel choice (docs/cuda.md, "Kernel choice"): one pure function of the config, the
// device's properties and the user's overrides that names the kernel variant of every stage and
// why. The Plan executes what it returns; the command line, config.json and the results files
// record it. A new variant of a stage (e.g. a Hopper wgmma kernel) is one more Variant value and
// one branch in pick_mma below (or a pick_<variant> beside it).
#include <algorithm>

#include "kernels.hpp"
#include "nsa_cuda.hpp"
#include "params.hpp"

namespace nsa::cuda {

namespace {

// Why the mma kernels cannot run cfg at this precision on this device (empty: they can).
std::string mma_obstacle(const Config& cfg, Precision dtype, const DeviceCaps& dev) {
  const int64_t G = cfg.G();
  if (dtype == Precision::FP32) return "dtype fp32 runs on CUDA cores (the mma kernels need bf16 or fp16 operands)";
  if (G != 1 && G != 2 && G != 4 && G != 8 && G != 16) return cat("G = ", G, " is not one of 1, 2, 4, 8, 16");
  if (!mma_compiled(int(cfg.dk), int(cfg.dv)))
    return cat("head dims dk = ", cfg.dk, ", dv = ", cfg.dv, " are not compiled for the mma kernels (NSA_CUDA_DIMS)");
  if (dev.major < 8) return cat("the device is sm_", dev.major, dev.minor, "; the mma kernels need sm_80 or newer");
  return "";
}

// Why the wgmma (Hopper) kernels cannot run cfg at this precision on this device (empty: they can).
std::string wgmma_obstacle(const Config& cfg, Precision dtype, const DeviceCaps& dev) {
  const int64_t G = cfg.G();
  if (!dev.wgmma)
    return cat("the device is sm_", dev.major, dev.minor, " or this build has no sm_90a code; the wgmma kernels need both");
  if (dtype == Precision::FP32) return "dtype fp32 runs on CUDA cores (the wgmma kernels need bf16 or fp16 operands)";
  if (G != 1 && G != 2 && G != 4 && G != 8 && G != 16) return cat("G = ", G, " is not one of 1, 2, 4, 8, 16");
  if (!((cfg.dk == 128 || cfg.dk == 192) && cfg.dv == 128))
    return cat("head dims dk = ", cfg.dk, ", dv = ", cfg.dv, ": the wgmma kernels are built for (128, 128) and (192, 128)");
  return "";
}

// The most warps in [1, most] (the override, or `most`) whose CTA fits the device, halving from
// there; 0 when not even one warp fits.
template <class Smem>
int fit_warps(Smem smem_of, int most, int override_warps, size_t optin) {
  int nw = std::min(most, std::max(1, override_warps > 0 ? override_warps : most));
  while (nw > 1 && smem_of(nw) > optin) nw /= 2;
  return smem_of(nw) <= optin ? nw : 0;
}

}  // namespace

std::string KernelChoice::summary() const {
  std::string s;
  for (int i = 0; i < kStages; ++i) {
    const StageChoice& c = stage[size_t(i)];
    s += cat(i ? " " : "", to_string(Stage(i)), "=", to_string(c.variant));
    if (c.fused_into >= 0) s += cat("(in ", to_string(Stage(c.fused_into)), ")");
    else if (c.warps > 0) s += cat("(", c.warps, " warps)");
  }
  return s;
}

KernelChoice choose_kernels(const Config& cfg, int64_t Tmax, const DeviceCaps& dev, const Options& opt) {
  KernelChoice k;
  auto want = [&](Stage s) { return opt.variant[size_t(s)]; };
  auto st = [&](Stage s) -> StageChoice& { return k.stage[size_t(s)]; };
  // What the user asked for, checked against what exists.
  if (want(Stage::Phi) != Variant::Auto && want(Stage::Phi) != Variant::Cublas)
    throw ConfigError(cat("phi = ", to_string(want(Stage::Phi)), ": phi runs one variant, cublas"));
  for (Stage s : {Stage::CmpAttn, Stage::Topn, Stage::SlcAttn, Stage::WinAttn, Stage::Combine})
    if (want(s) == Variant::Cublas) throw ConfigError(cat(to_string(s), " = cublas: expected fp32, mma or auto"));
  for (Stage s : {Stage::Topn, Stage::SlcAttn})
    if (want(s) == Variant::Wgmma)
      throw ConfigError(cat(to_string(s), " = wgmma: only cmp_attn and win_attn (with combine) have wgmma kernels; ",
                            to_string(s), " runs fp32 or mma"));
  // The fp32 compression kernel computes the top-n too, and the mma window kernel the combine:
  // such pairs take one variant.
  auto pair = [&](Stage a, Stage b, const char* why) {
    if (want(a) != Variant::Auto && want(b) != Variant::Auto && want(a) != want(b))
      throw ConfigError(cat(to_string(a), " = ", to_string(want(a)), " and ", to_string(b), " = ", to_string(want(b)),
                            " cannot run together: ", why));
    return want(a) != Variant::Auto ? want(a) : want(b);
  };
  // topn follows cmp_attn's mma or wgmma kernel with its own mma kernel; a wgmma combine is the
  // wgmma win_attn's epilogue.
  const Variant cmp = want(Stage::CmpAttn) == Variant::Wgmma && want(Stage::Topn) != Variant::Fp32
                          ? Variant::Wgmma
                          : pair(Stage::CmpAttn, Stage::Topn, "the fp32 cmp_attn kernel computes the top-n as well");
  const Variant win = pair(Stage::WinAttn, Stage::Combine, "the mma and wgmma win_attn kernels compute the combine as well");
  const Variant slc = want(Stage::SlcAttn);
  for (int i = 0; i < kStages; ++i)
    if (opt.warps[size_t(i)] < 0 || opt.warps[size_t(i)] > 8)
      throw ConfigError(cat("warps of ", to_string(Stage(i)), " = ", opt.warps[size_t(i)],
                            " is invalid: expected 0 (chosen) to 8"));

  const std::string obstacle = mma_obstacle(cfg, opt.dtype, dev);
  for (auto [s, v] : {std::pair{Stage::CmpAttn, cmp}, {Stage::SlcAttn, slc}, {Stage::WinAttn, win}})
    if (v == Variant::Mma && !obstacle.empty())
      throw ConfigError(cat(to_string(s), " = mma cannot run this config: ", obstacle));
  const std::string wg_obstacle = wgmma_obstacle(cfg, opt.dtype, dev);
  for (auto [s, v] : {std::pair{Stage::CmpAttn, cmp}, {Stage::WinAttn, win}})
    if (v == Variant::Wgmma && !wg_obstacle.empty())
      throw ConfigError(cat(to_string(s), " = wgmma cannot run this config: ", wg_obstacle));

  // The layer's shapes at the longest sequence: what the shared memory of each kernel depends on.
  FwdParams p;
  static_cast<LayerParams&>(p) = layer_params(cfg);
  p.Tmax = int(std::min<int64_t>(Tmax, int64_t(1) << 30));
  p.NB = int(cfg.num_slc_blocks(Tmax));
  const size_t optin = dev.smem_optin;
  const std::string no_fit = cat(" needs more shared memory than the device's ", optin, " bytes per block (sequence of ",
                                 Tmax, " tokens: ", p.NB, " selection blocks per position)");

  st(Stage::Phi) = {Variant::Cublas, 0, -1, cfg.compress == CompressKind::Mean ? "mean: one kernel" : "cuBLAS products"};

  // ---- cmp_attn + topn ----
  auto cmp_fp32 = [&](const std::string& why) {
    st(Stage::CmpAttn) = {Variant::Fp32, 0, -1, why};
    st(Stage::Topn) = {Variant::Fp32, 0, int(Stage::CmpAttn), why};
  };
  if (cmp == Variant::Fp32) {
    cmp_fp32("fp32 requested");
  } else if (!obstacle.empty()) {
    cmp_fp32("fp32: " + obstacle);
  } else if (cmp == Variant::Wgmma || (cmp == Variant::Auto && wg_obstacle.empty())) {
    // The Hopper kernel (cmp_attn_sm90.cu): 8.15 ms against mma's 16.7 at 64k on the H200
    // (docs/cuda_sm90.md); its grid is persistent (one CTA per SM walking the work, longest first)
    // from 16k on, one CTA per work item below (8k: 0.403 ms against the persistent grid's 0.455).
    const std::string why = cmp == Variant::Wgmma ? "wgmma requested" : "wgmma: Hopper's wgmma and TMA, the fastest measured";
    st(Stage::CmpAttn) = {Variant::Wgmma, 0, -1, cat(why, Tmax > 8192 ? " (persistent grid)" : " (a CTA per work item)")};
    const int sc = fit_warps([&](int nw) { return topn_mma_smem(p, nw); }, 8, opt.warps[size_t(Stage::Topn)], optin);
    if (sc) st(Stage::Topn) = {Variant::Mma, sc, -1, "mma: tensor cores (its wgmma twin measured slower, docs/cuda_sm90.md)"};
    else throw ResourceError(cat("topn = mma", no_fit));
  } else {
    // FlashAttention-2's shape: warps of 32 rows, 4 per CTA where two CTAs fit in an SM's shared
    // memory (dk = dv = 128), else 8 (dk = 192), so that an SM holds 8 warps either way (4 or 8
    // measure the same at 64k, 32.6 / 32.5 ms).
    const int fa_most = 2 * (cmp_attn_mma_smem(p, 4) + dev.smem_reserved) <= dev.smem_per_sm ? 4 : 8;
    const int fa = fit_warps([&](int nw) { return cmp_attn_mma_smem(p, nw); }, 8,
                             opt.warps[size_t(Stage::CmpAttn)] ? opt.warps[size_t(Stage::CmpAttn)] : fa_most, optin);
    const int sc = fit_warps([&](int nw) { return topn_mma_smem(p, nw); }, 8, opt.warps[size_t(Stage::Topn)], optin);
    if (fa && sc) {
      const std::string why = cmp == Variant::Mma ? "mma requested" : "mma: tensor cores, the fastest measured";
      st(Stage::CmpAttn) = {Variant::Mma, fa, -1, why};
      st(Stage::Topn) = {Variant::Mma, sc, -1, why};
    } else if (cmp == Variant::Mma) {
      throw ResourceError(cat("cmp_attn = mma", no_fit));
    } else {
      cmp_fp32(cat("fp32: the mma kernels", no_fit));
    }
  }
  if (st(Stage::CmpAttn).variant == Variant::Fp32 && cmp_attn_fp32_smem(p, std::min(p.G, 4)) > optin)
    throw ResourceError(cat("sequence of ", Tmax, " tokens: ", p.NB, " selection blocks per position need ",
                            cmp_attn_fp32_smem(p, std::min(p.G, 4)), " bytes of shared memory, more than the ", optin,
                            " bytes of one block"));

  // ---- slc_attn ----
  if (slc == Variant::Fp32) {
    st(Stage::SlcAttn) = {Variant::Fp32, 0, -1, "fp32 requested"};
  } else if (!obstacle.empty()) {
    st(Stage::SlcAttn) = {Variant::Fp32, 0, -1, "fp32: " + obstacle};
  } else {
    const int nw = fit_warps([&](int w) { return slc_attn_mma_smem(p, w); }, 2, opt.warps[size_t(Stage::SlcAttn)], optin);
    if (nw) st(Stage::SlcAttn) = {Variant::Mma, nw, -1, slc == Variant::Mma ? "mma requested" : "mma: tensor cores"};
    else if (slc == Variant::Mma) throw ResourceError(cat("slc_attn = mma", no_fit));
    else st(Stage::SlcAttn) = {Variant::Fp32, 0, -1, cat("fp32: the mma kernel", no_fit)};
  }

  // ---- win_attn + combine ----
  auto win_fp32 = [&](const std::string& why) {
    st(Stage::WinAttn) = {Variant::Fp32, 0, -1, why};
    st(Stage::Combine) = {Variant::Fp32, 0, -1, why};
  };
  if (win == Variant::Fp32) {
    win_fp32("fp32 requested");
  } else if (!obstacle.empty()) {
    win_fp32("fp32: " + obstacle);
  } else if (win == Variant::Wgmma || (win == Variant::Auto && wg_obstacle.empty())) {
    // The Hopper kernel (win_attn_sm90.cu), combine in its epilogue: 3.56 ms against mma's 8.03
    // at 64k, 0.421 against 1.000 at 8k on the H200 (docs/cuda_sm90.md).
    st(Stage::WinAttn) = {Variant::Wgmma, 0, -1, win == Variant::Wgmma ? "wgmma requested" : "wgmma: Hopper's wgmma and TMA, the fastest measured"};
    st(Stage::Combine) = {Variant::Wgmma, 0, int(Stage::WinAttn), "in win_attn's epilogue (it runs last)"};
  } else {
    const int nw = fit_warps([&](int w) { return win_attn_mma_smem(p, w); }, 8, opt.warps[size_t(Stage::WinAttn)], optin);
    if (nw) {
      const std::string why = win == Variant::Mma ? "mma requested" : "mma: tensor cores";
      st(Stage::WinAttn) = {Variant::Mma, nw, -1, why};
      st(Stage::Combine) = {Variant::Mma, 0, int(Stage::WinAttn), "in win_attn's epilogue (it runs last)"};
    } else if (win == Variant::Mma) {
      throw ResourceError(cat("win_attn = mma", no_fit));
    } else {
      win_fp32(cat("fp32: the mma kernel", no_fit));
    }
  }
  bool any_fp32 = false;
  for (int i = int(Stage::CmpAttn); i < kStages; ++i) any_fp32 = any_fp32 || k.stage[size_t(i)].variant == Variant::Fp32;
  if (any_fp32 && cfg.dv > 256)
    throw ConfigError(cat("dv = ", cfg.dv, " is invalid for the CUDA path: expected <= 256 (the fp32 kernels)"));

  // ---- the backward pass: one variant for all its stages ----
  if (!opt.backward) {
    k.backward = {Variant::Auto, 0, -1, "no backward pass (Options::backward)"};
  } else if (opt.bwd_variant == Variant::Fp32) {
    k.backward = {Variant::Fp32, 0, -1, "fp32 requested"};
  } else if (opt.bwd_variant == Variant::Mma || opt.bwd_variant == Variant::Auto) {
    const bool asked = opt.bwd_variant == Variant::Mma;
    if (!obstacle.empty()) {
      if (asked) throw ConfigError(cat("backward = mma cannot run this config: ", obstacle));
      k.backward = {Variant::Fp32, 0, -1, "fp32: " + obstacle};
    } else if (bwd_mma_smem(p) > optin) {
      if (asked)
        throw ResourceError(cat("backward = mma needs ", bwd_mma_smem(p), " bytes of shared memory per block, more "
                                "than the device's ", optin));
      k.backward = {Variant::Fp32, 0, -1, cat("fp32: the mma kernels need ", bwd_mma_smem(p), " bytes of shared memory")};
    } else {
      k.backward = {Variant::Mma, 0, -1, asked ? "mma requested" : "mma: tensor cores"};
    }
  } else {
    throw ConfigError(cat("backward = ", to_string(opt.bwd_variant), ": expected fp32, mma or auto"));
  }
  if (k.backward.variant == Variant::Fp32 && (cfg.dk > 256 || cfg.dv > 256))
    throw ConfigError(cat("backward kernel fp32 handles head dims up to 256; dk = ", cfg.dk, ", dv = ", cfg.dv));
  return k;
}

}  // namespace nsa::cuda
