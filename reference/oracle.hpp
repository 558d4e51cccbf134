// Internal: the oracle's per-sequence entry points, called by forward() and full_attention().
#pragma once

#include "nsa_ref.hpp"

namespace nsa::ref {

// Fills rows [t0, t0 + T) of every output of r (and compressed rows from cmp0) for one sequence.
// r.gates must already hold the gates.
template <class S>
void oracle_forward_seq(const Config& cfg, const Inputs<S>& in, int64_t t0, int64_t T, int64_t cmp0,
                        ForwardResult<S>& r);

template <class S>
void oracle_full_seq(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v, int64_t t0,
                     int64_t T, FullResult<S>& r);

}  // namespace nsa::ref
