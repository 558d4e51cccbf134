// Trainability (docs/experiments.md, "Trainability"): NSA's compression MLP phi and its gates
// learned by gradient descent through the reference backward pass (docs/spec.md 7), on a
// synthetic retrieval objective, to show that the selection, which gets no gradient of its own
// (its top-n is discrete), learns to find what matters through the compression branch: the
// importance scores of Eq. 8 are the compression branch's attention probabilities.
//
// Each step draws a fresh batch of needle workloads (workloads.hpp): `batch` sequences of T
// tokens, needle depths uniform in [0, depth_max] (depth_max < 1 keeps the needle out of the
// window, so it must be retrieved through compression or selection), a fresh haystack. The
// question rows t (the last `questions` tokens) of every head h must output the needle's answer
// w of their group:
//   loss = mean over (question t, head h, coordinate e) of (o[t,h,e] - w[g(h),e])^2,
// o the gated NSA output (Eq. 5). Learned: phi for keys and values (pe, w1, b1, w2, b2 of the
// mlp kind, or pe, w, b of linear) and the gate MLP g = sigmoid(x W + b) (docs/spec.md 2) with one
// constant feature x[t] = 1, W and b starting at 0 (every gate 1/2): per-head gates, since the
// synthetic tokens carry no feature that should switch branches token by token (a query-valued
// x made the gates follow the random needle direction, noise). q, k, v are data. Adam (Kingma and Ba 2015) with the usual betas (0.9, 0.999), eps 1e-8.
//
// Logged per step, on the step's batch before the update (fresh data: an unbiased held-out
// estimate): the loss, needle_found (sweep.hpp's definition), the selection's recall and mass
// against the oracle (analysis/recall.hpp) at the question rows, the mean gates at the question
// rows, and the gradient norm.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "config.hpp"
#include "nsa_ref.hpp"
#include "workloads.hpp"

namespace nsa::cli {

struct TrainSpec {
  Config cfg;               // NSA settings and heads (Hq, Hkv, dk, dv)
  GenSpec data;             // the needle workload's T, needle_len, needle_strength, questions
  int64_t batch = 4;        // sequences per step
  double depth_max = 0.8;   // needle depths ~ U[0, depth_max]
  int64_t steps = 300;
  double lr = 3e-3;
  uint64_t seed = 0;        // phi's initial draw (ref::random_compress_params) and the data stream
  bool learn_phi = true;
  bool learn_gates = true;
};

struct StepLog {
  int64_t step = 0;
  double loss = 0;
  double needle_found = 0;
  double recall = 0, mass = 0;
  double gate[kBranches] = {0, 0, 0};
  double grad_norm = 0;
  double seconds = 0;
};

struct TrainResult {
  std::vector<StepLog> log;
  ref::CompressParams<double> phi;  // learned
  Tensor<double> gate_w;            // [1, 3*Hq]  (features x = 1)
  Tensor<double> gate_b;            // [3*Hq]
};

// Throws ConfigError naming the first bad field.
void validate(const TrainSpec& spec);

// Runs the training; `on_step` (if given) sees each step's log as it is made.
TrainResult train(const TrainSpec& spec, const std::function<void(const StepLog&)>& on_step = nullptr);

}  // namespace nsa::cli
