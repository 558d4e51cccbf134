// The comparison rules of `nsa compare` (INTERFACE.md) on tensors in memory: one place, used by
// the command (experiments/cmd_compare.cpp, on files) and the Python binding (nsa.compare, on
// arrays), so both apply the same rules and print the same report line.
//   float tensors: PASS when every element has |a - b| <= atol + rtol * |b| (numpy.allclose,
//                  B is the reference), or with rel_l2 when ||a - b|| / ||b|| <= rtol; NaN never
//                  passes; equal infinities (lse of an empty branch) match.
//   int tensors:   exact equality; block_idx rows that differ pass only at near-ties, when B's
//                  block_scores are given and every differing block's score lies within tie_tol
//                  (relative) of the n-th selected score (NSA-SPEC.md 4).
#pragma once

#include <cstdint>
#include <string>

#include "tensor.hpp"

namespace nsa {

struct CompareTolerance {
  double rtol = 1e-5;
  double atol = 1e-8;
  double tie_tol = 1e-3;
  bool rel_l2_metric = false;  // false: allclose
};

// Throws ConfigError when a tolerance is negative or not finite, or the metric is unknown.
CompareTolerance make_compare_tolerance(double rtol, double atol, double tie_tol, const std::string& metric);

struct CompareResult {
  bool pass = false;
  std::string line;  // "PASS o.npy  shape [..]  max_abs .. at [..]  rel_l2 ..": the command's line
  double max_abs = 0, rel_l2 = 0;
};

// A against the reference B, both floating (values in double). `label` starts the line.
CompareResult compare_float(const std::string& label, const Tensor<double>& a, const Tensor<double>& b,
                            const CompareTolerance& tol);

// A against B, both integer. With `block_idx`, rows (the last axis) that select other blocks pass
// at near-ties of `scores` (B's block_scores [..., NB]; nullptr: none, then `no_scores_note` is
// appended to the FAIL line).
CompareResult compare_int(const std::string& label, const Tensor<int64_t>& a, const Tensor<int64_t>& b,
                          const CompareTolerance& tol, bool block_idx, const Tensor<double>* scores,
                          const std::string& no_scores_note = " (no block_scores given to check near-ties)");

// The FAIL lines for tensors that cannot be compared element by element.
CompareResult compare_shape_mismatch(const std::string& label, const Shape& a, const Shape& b);
CompareResult compare_kind_mismatch(const std::string& label, const char* a_dtype, const char* b_dtype);

}  // namespace nsa
