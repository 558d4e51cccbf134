// Internal: the oracle's per-sequence entry points, called by forward() and full_attention().
#pragma once

#include "nsa_ref.hpp"

namespace nsa::ref {

// sum_i a[i] b[i] in ascending i: the one inner product of both oracles.
template <class S>
S dot(const S* a, const S* b, int64_t n) {
  S s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Fills rows [t0, t0 + T) of every output of r (and compressed rows from cmp0) for one sequence.
// r.gates must already hold the gates.
template <class S>
void oracle_forward_seq(const Config& cfg, const Inputs<S>& in, int64_t t0, int64_t T, int64_t cmp0,
                        ForwardResult<S>& r);

template <class S>
void oracle_full_seq(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v, int64_t t0,
                     int64_t T, FullResult<S>& r);

// The backward twins (oracle_backward.cpp): add the sequence's gradients into r (rows [t0, t0 + T),
// compressed rows from cmp0). r's tensors must be allocated and zero.
template <class S>
void oracle_backward_seq(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                         int64_t t0, int64_t T, int64_t cmp0, BackwardResult<S>& r);

template <class S>
void oracle_full_backward_seq(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                              const Tensor<S>& dO, int64_t t0, int64_t T, FullGrads<S>& r);

// The gate MLP's backward in plain loops: from dL/dg (r.dgates) and the gates g to r.dgate_mlp.
template <class S>
void oracle_gate_mlp_backward(const Config& cfg, const GateMlp<S>& m, const Tensor<S>& gates, BackwardResult<S>& r);

}  // namespace nsa::ref
