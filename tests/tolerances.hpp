// Tolerances of the CUDA path against the reference (STYLE 5): one place, each with its metric
// and its reason. The reference runs in double on the very inputs the device sees (rounded to the
// operand precision first), so every difference comes from the device's own rounding: operands
// rounded to bf16/fp16 where the device stores them (compressed K/V, the probabilities fed to the
// P V product, the branch outputs) and fp32 accumulation.
//
// Each bound is  c_metric * u + floor_metric:  u is the unit roundoff of the operand precision
// (bf16 2^-8, fp16 2^-11, fp32 2^-24), c_metric counts the roundings to that precision on the path
// to the quantity (with a margin of about 2 for their accumulation), and floor_metric is the error
// of the same computation done entirely in fp32 (kernel v0 in fp32 mode measures ~1e-7 to 1e-6
// for all of these; the floor leaves a margin of ~10). So the bf16 and fp16 bounds are the fp32
// computation's plus the rounding steps the 16-bit path adds.
#pragma once

#include <cmath>

#include "nsa_cuda.hpp"

namespace nsa::test::tol {

inline double unit_roundoff(cuda::Precision p) {
  switch (p) {
    case cuda::Precision::BF16: return std::ldexp(1.0, -8);
    case cuda::Precision::FP16: return std::ldexp(1.0, -11);
    case cuda::Precision::FP32: return std::ldexp(1.0, -24);
  }
  return 1;
}

struct Tolerances {
  // Relative L2 (test::rel_l2) of the compressed keys/values: the gathered block + pe rounded
  // once, the mlp hidden layer rounded once, the result rounded once: 3 roundings -> c = 4.
  double compress;
  // Relative L2 of a branch output O and of o: compressed K/V (as above), p rounded for P V,
  // O rounded on store, for o the three branches' roundings summed: c = 4.
  double attn;
  // Relative L2 of lse over the finite entries: lse moves by the probability-weighted mean of the
  // score errors, which come from the compressed keys' rounding only (q and k are exact): c = 2.
  double lse;
  // Relative L2 of the block scores P (Eq. 10): p = exp(s - lse) carries the errors of s and of
  // lse, each ~ u |s| with |s| up to ~4 for unit-variance inputs: c = 8.
  double scores;
  // A selected block may differ from the reference's only if its reference score is within
  // tie * (the reference's n-th score) of that n-th score: the per-element version of `scores`.
  double tie;
};

inline Tolerances for_precision(cuda::Precision p) {
  const double u = unit_roundoff(p);
  return {4 * u + 1e-5, 4 * u + 1e-5, 2 * u + 1e-6, 8 * u + 1e-5, 8 * u + 1e-5};
}

// Backward (docs/spec.md 7): relative L2 of every gradient tensor against ref::backward in double
// on the same rounded inputs, dL/do and selected blocks. A gradient carries the forward's
// roundings (`attn`, c = 4: P and dS depend on the rounded compressed K/V and on lse), plus its
// own: dS = P (dP - D) rounded for the dq and dK products (1), P rounded for the dV product (1),
// D formed from the rounded branch output O_c (1), and for phi's parameters the TF32 products of
// a bf16 run (u_tf32 = 2^-11 <= u) or fp32 ones: c = 8. The floor is 5e-5: the same computation in
// fp32 accumulates sums over up to a few thousand keys or blocks (sqrt(n) u_fp32 ~ 1e-6 to 1e-5).
// Gradients that are zero in exact arithmetic (the keys' phi biases, and the linear phi's dpe_k:
// every query's dS sums to zero over its keys, so the compressed keys' gradients sum to zero) are
// measured against the norm of the compressed keys' gradient instead of their own.
inline double grad_tol(cuda::Precision p) { return 8 * unit_roundoff(p) + 5e-5; }

// Gates computed by the gate MLP on the device in fp32 (cuBLAS, pedantic fp32), whatever the
// operand precision: relative L2 against the double reference.
constexpr double kGates = 1e-5;

}  // namespace nsa::test::tol
