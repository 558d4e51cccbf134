// The kernel choice (cuda/choice.cu): a pure function of the config, the device's properties and
// the overrides, so these tests run on made-up devices, without a GPU (test_cuda_host; CI runs
// them). The devices: an H100's shared memory (227 KiB per block, 228 KiB per SM, 1 KiB
// reserved), and one with 48 KiB per block.
#include <doctest/doctest.h>

#include <string>

#include "config.hpp"
#include "errors.hpp"
#include "nsa_cuda.hpp"

using namespace nsa;
using cuda::Stage;
using cuda::Variant;

namespace {

cuda::DeviceCaps h100() {
  cuda::DeviceCaps d;
  d.major = 9, d.minor = 0;
  d.smem_optin = 232448, d.smem_per_sm = 233472, d.smem_reserved = 1024;
  return d;
}

cuda::DeviceCaps small_smem() {
  cuda::DeviceCaps d = h100();
  d.major = 8;
  d.smem_optin = 49152;
  return d;
}

Config paper(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
  Config c;
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.validate();
  return c;
}

cuda::Options bf16() { return cuda::Options{}; }

}  // namespace

TEST_CASE("choice: the paper's shapes on an H100 run every stage on tensor cores, FlashAttention-2's warps") {
  const auto k = cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h100(), bf16());
  CHECK(k[Stage::Phi].variant == Variant::Cublas);
  for (Stage s : {Stage::CmpAttn, Stage::Topn, Stage::SlcAttn, Stage::WinAttn, Stage::Combine})
    CHECK(k[s].variant == Variant::Mma);
  // dk = dv = 128: two CTAs of 4 warps fit in an SM; topn 8 warps, slc_attn 2, win_attn 8.
  CHECK(k[Stage::CmpAttn].warps == 4);
  CHECK(k[Stage::Topn].warps == 8);
  CHECK(k[Stage::SlcAttn].warps == 2);
  CHECK(k[Stage::WinAttn].warps == 8);
  CHECK(k[Stage::Combine].fused_into == int(Stage::WinAttn));
  CHECK(k[Stage::Topn].fused_into == -1);
  CHECK(k.summary() ==
        "phi=cublas cmp_attn=mma(4 warps) topn=mma(8 warps) slc_attn=mma(2 warps) win_attn=mma(8 warps) "
        "combine=mma(in win_attn)");
  CHECK(k.backward.variant == Variant::Auto);  // no backward asked for
  // dk = 192: one CTA per SM, so 8 warps.
  CHECK(cuda::choose_kernels(paper(64, 4, 192, 128), 65536, h100(), bf16())[Stage::CmpAttn].warps == 8);
}

TEST_CASE("choice: fp32, G = 3, an sm_75 device and uncompiled head dims run the fp32 kernels, saying why") {
  cuda::Options o = bf16();
  o.dtype = cuda::Precision::FP32;
  auto k = cuda::choose_kernels(paper(16, 1, 128, 128), 4096, h100(), o);
  for (Stage s : {Stage::CmpAttn, Stage::Topn, Stage::SlcAttn, Stage::WinAttn, Stage::Combine})
    CHECK(k[s].variant == Variant::Fp32);
  CHECK(k[Stage::CmpAttn].why.find("dtype fp32") != std::string::npos);
  CHECK(k[Stage::Topn].fused_into == int(Stage::CmpAttn));
  CHECK(k[Stage::Combine].fused_into == -1);
  CHECK(k.summary() == "phi=cublas cmp_attn=fp32 topn=fp32(in cmp_attn) slc_attn=fp32 win_attn=fp32 combine=fp32");

  k = cuda::choose_kernels(paper(12, 4, 128, 128), 4096, h100(), bf16());
  CHECK(k[Stage::SlcAttn].variant == Variant::Fp32);
  CHECK(k[Stage::SlcAttn].why.find("G = 3") != std::string::npos);

  cuda::DeviceCaps turing = h100();
  turing.major = 7, turing.minor = 5;
  k = cuda::choose_kernels(paper(16, 1, 128, 128), 4096, turing, bf16());
  CHECK(k[Stage::WinAttn].variant == Variant::Fp32);
  CHECK(k[Stage::WinAttn].why.find("sm_75") != std::string::npos);

  k = cuda::choose_kernels(paper(16, 1, 96, 96), 4096, h100(), bf16());  // never compiled
  CHECK(k[Stage::CmpAttn].variant == Variant::Fp32);
  CHECK(k[Stage::CmpAttn].why.find("dk = 96") != std::string::npos);
}

TEST_CASE("choice: per-stage overrides, and the pairs one kernel runs together") {
  const Config c = paper(16, 1, 128, 128);
  cuda::Options o = bf16();
  o.variant[size_t(Stage::SlcAttn)] = Variant::Fp32;
  auto k = cuda::choose_kernels(c, 4096, h100(), o);
  CHECK(k[Stage::SlcAttn].variant == Variant::Fp32);
  CHECK(k[Stage::SlcAttn].why == "fp32 requested");
  CHECK(k[Stage::CmpAttn].variant == Variant::Mma);
  CHECK(k[Stage::WinAttn].variant == Variant::Mma);

  o = bf16();
  o.variant[size_t(Stage::Topn)] = Variant::Fp32;  // topn's fp32 variant is cmp_attn's fp32 kernel
  k = cuda::choose_kernels(c, 4096, h100(), o);
  CHECK(k[Stage::CmpAttn].variant == Variant::Fp32);
  CHECK(k[Stage::Topn].variant == Variant::Fp32);
  o.variant[size_t(Stage::CmpAttn)] = Variant::Mma;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 4096, h100(), o), doctest::Contains("cannot run together"), ConfigError);

  o = bf16();
  o.variant[size_t(Stage::Combine)] = Variant::Fp32;  // the fp32 combine needs the fp32 window kernel's O_win
  k = cuda::choose_kernels(c, 4096, h100(), o);
  CHECK(k[Stage::WinAttn].variant == Variant::Fp32);
  CHECK(k[Stage::Combine].fused_into == -1);

  o = bf16();
  o.variant[size_t(Stage::Phi)] = Variant::Mma;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 4096, h100(), o), doctest::Contains("phi"), ConfigError);
  o = bf16();
  o.variant[size_t(Stage::SlcAttn)] = Variant::Cublas;
  CHECK_THROWS_AS(cuda::choose_kernels(c, 4096, h100(), o), ConfigError);

  o = bf16();
  o.set_variant(Variant::Mma);
  o.dtype = cuda::Precision::FP16;
  k = cuda::choose_kernels(c, 4096, h100(), o);
  CHECK(k[Stage::CmpAttn].why == "mma requested");
  o.dtype = cuda::Precision::FP32;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 4096, h100(), o), doctest::Contains("cmp_attn = mma cannot run"),
                       ConfigError);
}

TEST_CASE("choice: warps per CTA, overridden and fitted") {
  const Config c = paper(16, 1, 128, 128);
  cuda::Options o = bf16();
  o.warps[size_t(Stage::CmpAttn)] = 2;
  o.warps[size_t(Stage::SlcAttn)] = 1;
  o.warps[size_t(Stage::Topn)] = 4;
  auto k = cuda::choose_kernels(c, 4096, h100(), o);
  CHECK(k[Stage::CmpAttn].warps == 2);
  CHECK(k[Stage::SlcAttn].warps == 1);
  CHECK(k[Stage::Topn].warps == 4);
  CHECK(k[Stage::WinAttn].warps == 8);
  o.warps[size_t(Stage::SlcAttn)] = 4;  // slc_attn takes at most 2
  CHECK(cuda::choose_kernels(c, 4096, h100(), o)[Stage::SlcAttn].warps == 2);
  o.warps[size_t(Stage::WinAttn)] = -1;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 4096, h100(), o), doctest::Contains("warps of win_attn = -1"),
                       ConfigError);
}

TEST_CASE("choice: shared memory decides per stage; an override that does not fit is refused by name") {
  // G = 1 at 48 KiB per block: the mma compression kernels do not fit; the fp32 ones do at 64k.
  const Config c = paper(4, 4, 128, 128);
  auto k = cuda::choose_kernels(c, 65536, small_smem(), bf16());
  CHECK(k[Stage::CmpAttn].variant == Variant::Fp32);
  CHECK(k[Stage::CmpAttn].why.find("shared memory") != std::string::npos);
  CHECK(k[Stage::SlcAttn].variant == Variant::Mma);
  cuda::Options o = bf16();
  o.variant[size_t(Stage::CmpAttn)] = Variant::Mma;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 65536, small_smem(), o), doctest::Contains("cmp_attn = mma needs more"),
                       ResourceError);
  // 1M tokens: 16384 selection blocks per position; not even the fp32 kernel holds their scores.
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, int64_t(1) << 20, small_smem(), bf16()),
                       doctest::Contains("16384 selection blocks"), ResourceError);
}

TEST_CASE("choice: the backward's variant, with Options::backward") {
  const Config c = paper(16, 1, 128, 128);
  cuda::Options o = bf16();
  o.backward = true;
  CHECK(cuda::choose_kernels(c, 4096, h100(), o).backward.variant == Variant::Mma);
  o.bwd_variant = Variant::Fp32;
  CHECK(cuda::choose_kernels(c, 4096, h100(), o).backward.why == "fp32 requested");
  o.bwd_variant = Variant::Mma;
  o.dtype = cuda::Precision::FP32;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(c, 4096, h100(), o), doctest::Contains("backward = mma cannot run"),
                       ConfigError);
}

TEST_CASE("choice: stage and variant names parse back, and bad names are listed") {
  for (int i = 0; i < cuda::kStages; ++i) CHECK(cuda::parse_stage(cuda::to_string(Stage(i))) == Stage(i));
  for (Variant v : {Variant::Auto, Variant::Fp32, Variant::Mma, Variant::Cublas})
    CHECK(cuda::parse_variant(cuda::to_string(v)) == v);
  CHECK_THROWS_WITH_AS(cuda::parse_stage("select"), doctest::Contains("cmp_attn, topn"), ConfigError);
  CHECK_THROWS_WITH_AS(cuda::parse_variant("v4"), doctest::Contains("fp32, mma"), ConfigError);
  cuda::Options o;
  cuda::parse_variants("cmp_attn=fp32,slc_attn=mma", o);
  CHECK(o.variant[size_t(Stage::CmpAttn)] == Variant::Fp32);
  CHECK(o.variant[size_t(Stage::SlcAttn)] == Variant::Mma);
  CHECK(o.variant[size_t(Stage::WinAttn)] == Variant::Auto);
  cuda::parse_variants("fp32", o);
  CHECK(o.variant[size_t(Stage::WinAttn)] == Variant::Fp32);
  CHECK(o.variant[size_t(Stage::Phi)] == Variant::Auto);
  cuda::parse_warps("topn=4,win_attn=2", o);
  CHECK(o.warps[size_t(Stage::Topn)] == 4);
  CHECK(o.warps[size_t(Stage::WinAttn)] == 2);
  CHECK_THROWS_WITH_AS(cuda::parse_variants("cmp_attn", o), doctest::Contains("STAGE=VARIANT"), ConfigError);
  CHECK_THROWS_WITH_AS(cuda::parse_warps("topn=x", o), doctest::Contains("topn=x"), ConfigError);
}

TEST_CASE("choice: on Hopper with sm_90a code, cmp_attn and win_attn+combine run the wgmma kernels") {
  cuda::DeviceCaps h200 = h100();
  h200.wgmma = true;
  auto k = cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h200, bf16());
  CHECK(k[Stage::CmpAttn].variant == Variant::Wgmma);
  CHECK(k[Stage::CmpAttn].why.find("persistent grid") != std::string::npos);
  CHECK(k[Stage::Topn].variant == Variant::Mma);  // its own kernel after the wgmma cmp_attn
  CHECK(k[Stage::Topn].fused_into == -1);
  CHECK(k[Stage::SlcAttn].variant == Variant::Mma);
  CHECK(k[Stage::WinAttn].variant == Variant::Wgmma);
  CHECK(k[Stage::Combine].variant == Variant::Wgmma);
  CHECK(k[Stage::Combine].fused_into == int(Stage::WinAttn));
  CHECK(k.summary() ==
        "phi=cublas cmp_attn=wgmma topn=mma(8 warps) slc_attn=mma(2 warps) win_attn=wgmma combine=wgmma(in win_attn)");
  // Short sequences: one CTA per work item. dk = 192 / dv = 128 is built too.
  CHECK(cuda::choose_kernels(paper(64, 4, 128, 128), 8192, h200, bf16())[Stage::CmpAttn].why.find("a CTA per work item") !=
        std::string::npos);
  CHECK(cuda::choose_kernels(paper(64, 4, 192, 128), 65536, h200, bf16())[Stage::WinAttn].variant == Variant::Wgmma);

  // The sm_80 path on the same device: mma forced for every stage.
  cuda::Options o = bf16();
  cuda::set_variant(o.variant, Variant::Mma);
  k = cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h200, o);
  for (Stage s : {Stage::CmpAttn, Stage::Topn, Stage::SlcAttn, Stage::WinAttn, Stage::Combine})
    CHECK(k[s].variant == Variant::Mma);

  // Shapes the wgmma kernels are not built for fall back to mma, saying why.
  k = cuda::choose_kernels(paper(64, 4, 64, 64), 8192, h200, bf16());
  CHECK(k[Stage::CmpAttn].variant != Variant::Wgmma);
  k = cuda::choose_kernels(paper(12, 4, 128, 128), 4096, h200, bf16());  // G = 3
  CHECK(k[Stage::WinAttn].variant == Variant::Fp32);

  // Overrides: wgmma where it cannot run, or on a stage without a wgmma kernel, is refused by name.
  o = bf16();
  o.variant[size_t(Stage::CmpAttn)] = Variant::Wgmma;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h100(), o),
                       doctest::Contains("cmp_attn = wgmma cannot run this config"), ConfigError);
  k = cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h200, o);
  CHECK(k[Stage::CmpAttn].why == "wgmma requested (persistent grid)");
  o = bf16();
  o.variant[size_t(Stage::SlcAttn)] = Variant::Wgmma;
  CHECK_THROWS_WITH_AS(cuda::choose_kernels(paper(64, 4, 128, 128), 65536, h200, o),
                       doctest::Contains("slc_attn = wgmma: only cmp_attn and win_attn"), ConfigError);
  o = bf16();
  o.dtype = cuda::Precision::FP32;
  k = cuda::choose_kernels(paper(64, 4, 128, 128), 8192, h200, o);
  CHECK(k[Stage::CmpAttn].variant == Variant::Fp32);
}
