// The CUDA path of NSA (docs/spec.md): the reference's semantics on an NVIDIA GPU (Hopper first,
// Ampere supported): the forward pass, the backward pass and decoding with a KV cache. Host-side
// API, free of Eigen and of CUDA headers, so the CLI and the tests include it like
// reference/nsa_ref.hpp.
//
// cuda/ is cut by stage, as reference/ and the tests are (docs/cuda.md, "Stages and files"):
//   phi.cu, phi_bwd.cu            phi (Eq. 7): mean, linear, mlp (cuBLAS block products); backward
//   cmp_attn.cu, cmp_attn_bwd.cu  compression attention (its fp32 kernel also runs the topn stage)
//   topn.cu, topn.cuh             Eq. 8-11: scores, the overlap mapping, group sums, top-n
//   slc_attn.cu, slc_attn_bwd.cu  selection attention (Eq. 12), group-centric (slc_attn.cuh)
//   win_attn.cu, win_attn_bwd.cu  sliding-window attention (its mma kernel also runs the combine)
//   combine.cu, combine_bwd.cu    the gates (given, or the gate MLP) and Eq. 5
// and the passes that run them:
//   choice.cu     choose_kernels: the variant of each stage and why
//   plan.cu       Plan: buffers and the forward's launches; backward.cu: its backward stages
//   measure.cu    timing (L2 flush, events, warm-up, medians) and the card's ceilings
//   host.cu       precision conversions, device queries, random fills
//   decode.cu     Decoder: the device cache, prefill, step; decode_attn.cu: the step's kernels
//                 (split-softmax attention over the three branches, Eq. 8-11, the merges, Eq. 5)
// Each stage has an fp32 variant (CUDA cores, fp32 arithmetic on operands of any precision, any
// shape: the obviously-right kernels and the --dtype fp32 debug mode) and an mma variant (tensor
// cores, the fastest measured); docs/cuda.md keeps the history of the retired versions.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "decode.hpp"
#include "nsa_ref.hpp"
#include "stages.hpp"

struct CUstream_st;  // cudaStream_t, without the CUDA headers

namespace nsa::cuda {

// Operand precision of the device computation; accumulation is always fp32.
enum class Precision { BF16, FP16, FP32 };
const char* to_string(Precision p);             // "bf16", "fp16", "fp32"
Precision parse_precision(const std::string&);  // throws ConfigError naming the choices
int element_size(Precision p);                  // bytes per stored element

// Rounds x to the nearest value of the precision (round to nearest even), as the device stores
// it; tests feed the reference the same rounded inputs.
float round_to(Precision p, float x);
Tensor<float> round_to(Precision p, const Tensor<float>& t);
ref::Inputs<float> round_to(Precision p, const ref::Inputs<float>& in);

// True when a CUDA device is usable; otherwise *why says what is missing.
bool available(std::string* why = nullptr);
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)"; throws CudaError without a device.
std::string device_name();

// ---- How each stage runs (stages.hpp: the stages and variants; docs/cuda.md, "Kernel choice") ----

struct Options {
  Precision dtype = Precision::BF16;
  // Per stage (index: int(Stage)): the variant to run (Auto: chosen) and the warps per CTA of
  // its mma kernel (0: chosen; cmp_attn, topn and win_attn 1-8, slc_attn 1-2, rounded down to
  // what fits). On the command line: --variant STAGE=V,... and --warps STAGE=N,...
  StageVariants variant{};
  StageWarps warps{};
  bool intermediates = true;  // also produce o_win and block_scores (o_cmp, o_slc, lse, block_idx
                              // and the compressed K/V are always produced: later stages use them)
  int device = 0;
  // ---- backward (cuda/backward.cu) ----
  bool backward = false;                // the plan also runs the backward pass (keeps O_win, holds gradients)
  Variant bwd_variant = Variant::Auto;  // of every backward stage: Fp32, Mma or Auto (--bwd-variant)
  bool deterministic = false;           // backward without floating-point atomics: bitwise repeatable
  // ---- decode (cuda/decode.cu) ----
  int decode_kernel = -1;  // the decode step's split kernel (-1: kDefaultDecodeKernel): 1 every tile by the
                           // general path; 2 regular tiles by strided copies and an unmasked softmax;
                           // 3 = 2 with 16-key tiles and twice the warps per SM (--dec-kernel)
  int dec_waves = 1;            // waves of split CTAs the step's grid aims at (--dec-waves)
  bool dec_pdl = true;          // programmatic dependent launch between the step's kernels, sm_90+ (--dec-pdl)
  bool dec_evict_first = true;  // the cache's K/V streamed with the L2 evict_first policy (--dec-evict-first)

  // Every stage but phi to v (Auto, Fp32 or Mma).
  void set_variant(Variant v) { cuda::set_variant(variant, v); }
};

// The command line's --variant and --warps (stages.hpp) on opt's fields.
inline void parse_variants(const std::string& spec, Options& opt) { parse_variants(spec, opt.variant); }
inline void parse_warps(const std::string& spec, Options& opt) { parse_warps(spec, opt.warps); }

// The decode step's split kernel when Options::decode_kernel is -1 (docs/cuda_decode.md: measured).
constexpr int kDefaultDecodeKernel = 2;

// True when the mma kernels are compiled for these head dims (NSA_CUDA_DIMS).
bool mma_compiled(int dk, int dv);

// What the kernel choice reads of a device.
struct DeviceCaps {
  int major = 0, minor = 0;  // compute capability
  size_t smem_optin = 0;     // bytes of shared memory one block may opt in to
  size_t smem_per_sm = 0;    // bytes of shared memory per SM
  size_t smem_reserved = 0;  // bytes the runtime reserves per block
  bool wgmma = false;        // compute capability 9.0 and this build has sm_90a code (the wgmma kernels)
};
DeviceCaps device_caps(int device = 0);  // throws CudaError without a device

// The variant of one stage and why; fused_into >= 0: it runs inside that stage's kernel (topn in
// cmp_attn's fp32 kernel, combine in win_attn's mma kernel).
struct StageChoice {
  Variant variant = Variant::Auto;
  int warps = 0;        // warps per CTA of its kernel (0: fixed by the kernel)
  int fused_into = -1;  // an int(Stage), or -1
  std::string why;
};
struct KernelChoice {
  std::array<StageChoice, kStages> stage;
  StageChoice backward;  // every backward stage's (Options::backward; else variant Auto)
  const StageChoice& operator[](Stage s) const { return stage[size_t(s)]; }
  // "phi=cublas cmp_attn=mma(4 warps) topn=mma(8 warps) ... combine=mma(in win_attn)"
  std::string summary() const;
};
// The kernel of every stage for cfg (sequences of up to Tmax tokens; the block scores' shared
// memory grows with it) on a device with `dev`'s properties, under opt's overrides: a pure
// function, which the Plan executes and the command line records. Auto picks wgmma where it can
// run (Hopper, cmp_attn and win_attn+combine), else mma where it can run and fits, else fp32 (why
// says which obstacle); an override that cannot run throws
// ConfigError (it cannot run this config) or ResourceError (it does not fit), naming why.
KernelChoice choose_kernels(const Config& cfg, int64_t Tmax, const DeviceCaps& dev, const Options& opt);

// Time of one stage of a timed run, in milliseconds.
struct StageTime {
  std::string stage;  // the stage's name; stages one kernel runs together are joined by '+'
                      // ("cmp_attn+topn", "win_attn+combine"); "combine.gates": the gate MLP
  double ms;
};

struct BenchResult {
  double ms = 0;                  // median of the whole forward
  std::vector<StageTime> stages;  // per-stage medians
  KernelChoice kernels;           // what ran
};
// Forward + backward timing (Options::backward): medians of run + run_backward together, of
// run_backward alone (after one forward), and the backward's per-stage medians.
struct BwdBenchResult {
  double fwd_bwd_ms = 0;
  double bwd_ms = 0;
  std::vector<StageTime> stages;
  KernelChoice kernels;  // what ran, the backward's included
  bool deterministic = false;
};
class Plan;
// Median time of plan.run (ms) over `reps` repeats after `warmup` runs, with the L2 cache flushed
// before each repeat, and the per-stage medians of as many timed runs.
BenchResult bench(Plan& plan, int warmup, int reps);
// The same for the backward pass (plan made with Options::backward, gradient of the output set);
// the L2 cache is flushed before every timed repeat.
BwdBenchResult bench_backward(Plan& plan, int warmup, int reps);

// The card's measured ceilings (docs/cuda.md, "Benchmark"): a square matrix product through cuBLAS (operands of
// the precision, fp32 accumulation; n = 8192), a device-to-device copy (bytes read + written),
// and reads of a buffer that fits in L2 (16-byte loads, every SM): the rate at which kernels can
// pull K/V that is already on chip, the bound of the selection branch on random selections.
struct Ceilings {
  double matmul_tflops = 0;
  double copy_tbps = 0;
  double l2_read_tbps = 0;
};
Ceilings measure_ceilings(Precision p, int device = 0);

// A forward pass held on the device: buffers sized for one config and one packing of sequences,
// reusable across runs (the benchmark times `run` alone, without host copies).
class Plan {
 public:
  // cu_seqlens: [B+1] offsets of packed sequences (empty: one sequence of N tokens).
  Plan(const Config& cfg, int64_t N, std::vector<int64_t> cu_seqlens, const Options& opt);
  ~Plan();
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // Rounds and copies host inputs (which must have passed ref::check_inputs) to the device.
  void upload(const ref::Inputs<float>& in);
  // Fills the inputs on the device: q, k, v ~ N(0, 1) (shared K/V), gates ~ U(0, 1), and the
  // compression parameters of ref::random_compress_params(seed). For benchmarks.
  void randomize(uint64_t seed);
  // The forward pass on the device buffers, enqueued on `stream` (nullptr: the default stream).
  void run(CUstream_st* stream = nullptr);
  // One run with events between stages; synchronises.
  std::vector<StageTime> run_timed();
  // Copies every output back, in the reference's layout.
  ref::ForwardResult<float> download() const;

  // ---- backward (docs/spec.md 7; Options::backward) ----
  // Rounds and copies dL/do [N, Hq, dv] to the device.
  void upload_grad(const Tensor<float>& dO);
  // dL/do ~ N(0, 1) on the device. For benchmarks.
  void randomize_grad(uint64_t seed);
  // The backward pass of the last `run`, enqueued on `stream`: every gradient of ref::backward.
  void run_backward(CUstream_st* stream = nullptr);
  // One backward run with events between stages; synchronises.
  std::vector<StageTime> run_backward_timed();
  // Copies every gradient back, in the reference's layout (ref::BackwardResult).
  ref::BackwardResult<float> download_grads() const;
  // Switches between the fast mode (atomics where partial sums meet) and the deterministic one.
  void set_deterministic(bool on);

  // ---- Device-resident inputs and output (the Python binding's CUDA tensors; cuda/device_io.cu) ----
  // Caller-owned device memory on the plan's device, C-contiguous, in the host inputs' layouts.
  struct DevicePhi {            // phi's parameters, shaped as ref::PhiParams (unused for mean)
    const float* pe = nullptr;  // [Hkv, l, D]     fp32
    const void* w = nullptr;    // [Hkv, D, l*D]   elem   linear
    const float* b = nullptr;   // [Hkv, D]        fp32
    const void* w1 = nullptr;   // [Hkv, h_c, l*D] elem   mlp
    const float* b1 = nullptr;  // [Hkv, h_c]      fp32
    const void* w2 = nullptr;   // [Hkv, D, h_c]   elem
    const float* b2 = nullptr;  // [Hkv, D]        fp32
  };
  struct DeviceIO {
    const void* q = nullptr;       // [N, Hq, dk]  elements of Options::dtype
    const void* k = nullptr;       // [N, Hkv, dk] elem, read by all three branches
    const void* v = nullptr;       // [N, Hkv, dv] elem
    const float* gates = nullptr;  // [N, Hq, 3]   fp32 in [0, 1]
    void* o = nullptr;             // [N, Hq, dv]  elem, written by run
    DevicePhi phi_k, phi_v;
  };
  // Points the plan at caller-owned memory instead of its own input buffers: the next runs read
  // q, k, v, the gates and phi's parameters from there and write o there, with no copy and no
  // synchronisation, so that run(stream) can be captured in a CUDA graph. The memory must outlive
  // those runs; a bound plan is not uploaded to again (upload() would write into it).
  void bind_device(const DeviceIO& io);

  // The variant of every stage that runs, and why (choose_kernels' answer; its `backward` is set
  // with Options::backward).
  const KernelChoice& kernels() const;
  const Config& config() const;
  size_t device_bytes() const;    // bytes allocated on the device
  struct Impl;

 private:
  friend BenchResult bench(Plan& plan, int warmup, int reps);
  friend BwdBenchResult bench_backward(Plan& plan, int warmup, int reps);
  Impl* impl_;
};

// forward = Plan + upload + run + download: same shapes and meanings as ref::forward; *ran (if
// given) receives the kernels that ran.
ref::ForwardResult<float> forward(const Config& cfg, const ref::Inputs<float>& in, const Options& opt,
                                  KernelChoice* ran = nullptr);

// backward = Plan (Options::backward) + upload + run + upload_grad + run_backward + download: the
// gradients of ref::backward for dL/do = dO; *fwd (if given) receives the forward's results, whose
// block_idx the gradients hold fixed.
ref::BackwardResult<float> backward(const Config& cfg, const ref::Inputs<float>& in, const Tensor<float>& dO,
                                    const Options& opt, ref::ForwardResult<float>* fwd = nullptr);

// ---- Decoding with a KV cache (docs/spec.md 8; docs/cuda_decode.md) ------------------------------
//
// The CUDA twin of ref::DecodeCache and ref::decode_step (reference/decode.hpp): the cache lives on
// the device in the same layout (elements of the precision: compressed rows, the raw history, the
// rings of branches with keys/values of their own), and a step appends one token to each addressed
// sequence, emits a compressed row where the token completes a block, and returns every output
// and intermediate of ref::StepResult. Operands bf16 or fp16, fp32 accumulation; G <= 16 and the
// head dims of NSA_CUDA_DIMS (those of the mma kernels). Options' variants apply to the prefill's
// forward pass, Options::decode_kernel and the dec_* fields to the step.

class Decoder;
// A step's time and what it was split into (bench_decode).
struct DecodeTiming {
  double ms = 0;                  // median step latency (L2 flushed before each repeat): ms_graph, or
                                  // ms_eager where the capture failed
  double ms_graph = 0;            // the step's kernels launched as one CUDA graph (0: capture failed)
  double ms_eager = 0;            // the step's kernels launched one by one
  std::vector<StageTime> stages;  // per-kernel medians
  int splits_cmp = 0, splits_win = 0, splits_slc = 0;  // CTAs per item of each branch
  int keys_cmp = 0, keys_win = 0, keys_slc = 0;        // keys per split
  int kernel = 0;                                      // the split kernel's version
  bool pdl = false;          // the kernels after the first launched with programmatic dependent launch
  bool evict_first = false;  // the cache's K/V streamed with the L2 evict_first policy
};
struct DecodeBench {
  DecodeTiming step;  // a step that emits no compressed row: the token at position s
  DecodeTiming emit;  // a step that emits one (the next position t >= s with (t + 1 - l) % d == 0)
  int64_t pos = 0, pos_emit = 0;
  size_t device_bytes = 0;
};
// Latency of one decode step for B sequences holding s tokens each (history, compressed rows and
// step inputs ~ N(0, 1), gates ~ U(0, 1), phi = ref::random_compress_params(seed), shared K/V):
// medians of `reps` steps after `warmup`, each step repeated at the same position (it rewrites the
// same cache rows), the L2 cache flushed before each repeat so that the cache is read from memory
// as when a model steps through its layers; the step's kernels launched one by one (ms_eager,
// and per kernel) and as one CUDA graph (ms_graph).
DecodeBench bench_decode(const Config& cfg, int64_t B, int64_t s, const Options& opt, int warmup, int reps,
                         uint64_t seed = 1);

class Decoder {
 public:
  // An empty cache for B sequences of up to `capacity` tokens. Throws ConfigError for what the
  // step cannot run (fp32, G > 16, dims not compiled), ResourceError when it does not fit.
  Decoder(const Config& cfg, const ref::KvSharing& share, int64_t B, int64_t capacity, const Options& opt);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // phi's parameters (linear, mlp), read by the steps that emit. A step uploads its inputs' phi
  // when none was set (once: a layer's phi does not change between steps).
  void set_phi(const ref::CompressParams<float>& phi);
  // Copies a host cache of the same config, sharing, B and capacity onto the device (rounded to
  // the precision), its lengths included; download() is the inverse.
  void upload(const ref::DecodeCache<float>& cache);
  ref::DecodeCache<float> download() const;
  // ref::prefill on the device: the CUDA forward pass on the prompts (packed, one per listed empty
  // sequence), whose outputs are returned; the cache takes the prompts' rows and the forward
  // pass's compressed rows.
  ref::ForwardResult<float> prefill(const ref::Inputs<float>& in, const std::vector<int64_t>& seqs = {});
  // The kernels the last prefill's forward pass ran (every variant Auto before the first).
  const KernelChoice& prefill_kernels() const;
  // ref::decode_step on the device: row b of `in` (one token per stepped sequence) goes to
  // sequence seqs[b]. Gates come from the inputs (given, the gate MLP evaluated on the host, or
  // ones). Refuses what ref::decode_step refuses, with the same error types.
  ref::StepResult<float> step(const ref::Inputs<float>& in, const std::vector<int64_t>& seqs = {});

  const std::vector<int64_t>& lengths() const;
  const Config& config() const;
  size_t device_bytes() const;
  struct Impl;

 private:
  friend DecodeBench bench_decode(const Config&, int64_t, int64_t, const Options&, int, int, uint64_t);
  Impl* impl_;
};

// ref::decode_workload on the device: each sequence's first prefix[b] tokens through
// Decoder::prefill (the CUDA forward pass), the rest one token per step, every sequence with
// tokens left stepping together; the returned cache is the device cache downloaded at the end.
ref::DecodeRun<float> decode_workload(const Config& cfg, const ref::Inputs<float>& in,
                                      const std::vector<int64_t>& prefix, const Options& opt,
                                      KernelChoice* prefill_kernels = nullptr);

}  // namespace nsa::cuda
