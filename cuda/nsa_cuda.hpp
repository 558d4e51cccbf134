// The CUDA path of the NSA forward pass (docs/spec.md 1-5): the reference's semantics
// on an NVIDIA GPU (Hopper first, Ampere supported). Host-side API, free of Eigen and of CUDA
// headers, so the CLI and the tests include it like reference/nsa_ref.hpp.
//
// Stages (cuda/, mirroring reference/):
//   compress.cu     phi (Eq. 7) for keys and values: mean, linear, mlp (cuBLAS block products)
//   cmp_attn.cu     compression attention, fused with the importance scores (Eq. 8-10) and the
//                   top-n selection (Eq. 11): neither the T x Nc probabilities nor the T x NB
//                   block scores reach device memory unless asked for
//   select.cu       selection attention (Eq. 12), group-centric: one warp holds all G heads of a
//                   group for 16/G consecutive positions and streams the union of their blocks
//   window.cu       sliding-window attention, fused with the gated sum (Eq. 5)
//   gate.cu         the gates (given, or the gate MLP) and the plain combine of kernel v0
//   forward.cu      Plan: buffers, the choice of kernel version, the sequence of launches
// and the backward pass (docs/spec.md 7), stage by stage, each the twin of reference/backward.cpp's:
//   gate_bwd.cu     dL/dg and the softmax deltas D_c; the gate MLP's backward (cuBLAS)
//   cmp_bwd.cu      compression attention: dq (query-centric), dK/dV of the compressed rows
//   select_bwd.cu   per-block lists of the queries that selected each block (counting sort);
//                   selection attention: dq (group-centric), dK/dV (key-centric, over the lists)
//   window_bwd.cu   window attention: dq, dK/dV
//   compress_bwd.cu phi's backward: to the raw k_cmp, v_cmp and phi's parameters (cuBLAS)
//   backward.cu     the backward stages of Plan, its version choice and benchmark
// and decoding with a KV cache (docs/spec.md 8), the twin of reference/decode.cpp:
//   decode_attn.cu  the step's kernels: split-softmax attention over the compressed rows, the
//                   window and the selected blocks (group-centric), Eq. 8-11, the merges and Eq. 5
//   decode.cu       Decoder: the device cache, prefill, step; decode_workload; bench_decode
// Backward versions: v0 = fp32 CUDA cores, one warp per (token, head) or (key, group), no atomics;
// v1 = tensor cores (mma.sync), FlashAttention-2's split: key-centric kernels for dK/dV, query-
// centric ones for dq (no atomics on dq); where many work items meet on one key (the compression
// keys, the selection blocks) the fast mode adds with fp32 atomics and the deterministic mode
// writes partial sums that one kernel adds in a fixed order.
// Kernel versions (STYLE 6): v0 = fp32 CUDA cores, one warp per (token, head), any shape: the
// obviously-right version and the fp32 debug mode; v1 = tensor cores (mma.sync m16n8k16, bf16 or
// fp16 operands, fp32 accumulation) for dk in {64, 128, 192}, dv in {64, 128}, G in {1, 2, 4, 8, 16};
// v2 = v1's computation with deeper pipelines, larger CTAs and fewer barriers; v3 = v2's compression
// and window kernels and v1's selection kernel with the per-element work trimmed; v4 = v3 with the
// compression branch in two kernels: FlashAttention-2 for O_cmp and lse, then the scores and top-n
// with lse known (the default).
// docs/cuda.md has each version's measured times.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "decode.hpp"
#include "nsa_ref.hpp"

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

struct Options {
  Precision dtype = Precision::BF16;
  int kernel = -1;           // -1: chosen from the config and the device; 0 to 4: that version
  bool intermediates = true;  // also produce o_win and block_scores (o_cmp, o_slc, lse, block_idx
                              // and the compressed K/V are always produced: later stages use them)
  int device = 0;
  // ---- backward (cuda/backward.cu) ----
  bool backward = false;       // the plan also runs the backward pass (keeps O_win, holds gradients)
  int bwd_kernel = -1;         // -1: chosen; 0: fp32 CUDA cores; 1: tensor cores
  bool deterministic = false;  // backward without floating-point atomics: bitwise repeatable
  // ---- decode (cuda/decode.cu) ----
  int decode_kernel = -1;  // the decode step's split kernel (-1: the default): 1 every tile by the
                           // general path; 2 regular tiles by strided copies and an unmasked softmax;
                           // 3 = 2 with 16-key tiles and twice the warps per SM
};

// True when the tensor-core kernels (v1-v3) are compiled for these head dims (NSA_CUDA_DIMS).
bool v1_compiled(int dk, int dv);

// The version `choose_kernel` picks, or the override; throws ConfigError when the override cannot
// run this config (the message says why). *why (if given) explains the choice.
int choose_kernel(const Config& cfg, const Options& opt, std::string* why = nullptr);

// The backward version `Plan` uses (v0: fp32 CUDA cores, any shape; v1: tensor cores, the shapes
// of forward v1-v3), or the override; throws ConfigError when the override cannot run this config.
int choose_bwd_kernel(const Config& cfg, const Options& opt, std::string* why = nullptr);

// Time of one stage of a timed run, in milliseconds.
struct StageTime {
  std::string stage;  // "compress", "cmp_attn+select", "slc_attn", "win_attn+combine", ...
  double ms;
};

struct BenchResult {
  double ms = 0;                  // median of the whole forward
  std::vector<StageTime> stages;  // per-stage medians
  int kernel = -1;
};
// Forward + backward timing (Options::backward): medians of run + run_backward together, of
// run_backward alone (after one forward), and the backward's per-stage medians.
struct BwdBenchResult {
  double fwd_bwd_ms = 0;
  double bwd_ms = 0;
  std::vector<StageTime> stages;
  int kernel = -1, bwd_kernel = -1;
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
  int bwd_kernel() const;         // the backward version in use

  int kernel() const;             // the version in use
  const Config& config() const;
  size_t device_bytes() const;    // bytes allocated on the device
  struct Impl;

 private:
  friend BenchResult bench(Plan& plan, int warmup, int reps);
  friend BwdBenchResult bench_backward(Plan& plan, int warmup, int reps);
// The same for the backward pass (plan made with Options::backward, gradient of the output set);
// the L2 cache is flushed before every timed repeat.
BwdBenchResult bench_backward(Plan& plan, int warmup, int reps);
  Impl* impl_;
};

// forward = Plan + upload + run + download: same shapes and meanings as ref::forward.
ref::ForwardResult<float> forward(const Config& cfg, const ref::Inputs<float>& in, const Options& opt);

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
// head dims of NSA_CUDA_DIMS (the same as kernels v1-v3). Options::kernel applies to the prefill's
// forward pass, Options::decode_kernel to the step.

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
                                      const std::vector<int64_t>& prefix, const Options& opt);

}  // namespace nsa::cuda
