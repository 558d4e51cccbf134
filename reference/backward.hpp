// The exact CPU reference of the NSA backward pass (docs/spec.md 7), in double or float.
// Included by nsa_ref.hpp; the types it builds on (Inputs, ForwardResult, PhiParams) are in forward.hpp.
//
// Given dL/do for a loss L of the output o (Eq. 5), backward() returns dL/d of every input the
// forward pass reads: q, each branch's keys and values, the gates (and the gate MLP's parameters
// and features x), and the compression parameters of phi. It reuses what the forward pass kept:
// the log-sum-exps (a probability is exp(s q.k - lse), no softmax is redone), the branch outputs,
// the compressed keys and values, the gates, and the selected blocks, which are held fixed: the
// top-n choice is discrete, so no gradient flows through p_cmp into the selection (section 7).
//
// Per branch c, with dO_c = g_c dL/do and P, O_c the branch's probabilities and output:
//   dL/dg_c   = <dL/do, O_c>                                  (section 7)
//   dP_u      = dO_c . v_u,  D = dO_c . O_c = sum_u P_u dP_u
//   dS_u      = P_u (dP_u - D)                               (softmax backward)
//   dL/dq    += s sum_u dS_u k_u,  dL/dk_u += s dS_u q,  dL/dv_u += P_u dO_c
// The compression branch's keys and values are phi's outputs; their gradients go on through phi
// into the raw k_cmp, v_cmp and phi's parameters. Gates from the gate MLP pass dL/dg through the
// sigmoid and the MLP.
//
// The two paths of forward() exist here too: Path::Oracle in plain loops, recomputing each
// softmax from the scores in the spec's order (reference/oracle_backward.cpp); Path::Fast with
// Eigen products and OpenMP over fixed chunks of query tiles (reference/backward.cpp). Keys and
// values receive gradient from many queries: each chunk adds into buffers of its own, which are
// summed in chunk order, so the result is bitwise independent of the thread count. The two paths
// agree to ~1e-13 relative in double.
#pragma once

#include "forward.hpp"

namespace nsa::ref {

// Gradients of the gate MLP (docs/spec.md 2), shaped like GateMlp's tensors.
template <class S>
struct GateMlpGrads {
  Tensor<S> x;   // [N, d_model]
  Tensor<S> w0;  // [d_model, d_hidden]  only with the hidden layer
  Tensor<S> b0;  // [d_hidden]
  Tensor<S> w;   // [d_in, 3*Hq]
  Tensor<S> b;   // [3*Hq]
};

template <class S>
struct BackwardResult {
  Tensor<S> dq;                                // [N, Hq, dk]
  std::array<Tensor<S>, kBranches> dk_branch;  // [N, Hkv, dk]  dL/dk_c: what branch c sends its keys
  std::array<Tensor<S>, kBranches> dv_branch;  // [N, Hkv, dv]  dL/dv_c
  // dL/dk and dL/dv of the shared k, v: the sum of dk_c (dv_c) over the branches that use them
  // (no keys/values of their own), in branch order. Empty when every branch has its own.
  Tensor<S> dk;                                // [N, Hkv, dk]
  Tensor<S> dv;                                // [N, Hkv, dv]
  Tensor<S> dgates;                            // [N, Hq, 3]   dL/dg, the gate values themselves
  CompressParams<S> dphi;                      // shaped like in.phi: the tensors of the configured
                                               //   phi kind (none for mean)
  GateMlpGrads<S> dgate_mlp;                   // only when the gates come from the gate MLP
  Tensor<S> dk_cmp_compressed;                 // [Nc_total, Hkv, dk]  dL/dphi(k_cmp): intermediate,
  Tensor<S> dv_cmp_compressed;                 // [Nc_total, Hkv, dv]  for the GPU kernels' tests
};

// Checks dL/do against the config (shape [N, Hq, dv]; finite unless allow_nonfinite). Throws
// InputError naming the tensor (role "do").
template <class S>
void check_output_grad(const Config& cfg, const Inputs<S>& in, const Tensor<S>& dO, bool allow_nonfinite = false,
                       const RoleNamer& name = nullptr);

// The NSA backward pass (docs/spec.md 7). `fwd` must be forward(cfg, in) (either path); dO is
// dL/do [N, Hq, dv]. Inputs must have passed check_inputs and dO check_output_grad.
template <class S>
BackwardResult<S> backward(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                           Path path = Path::Fast);

template <class S>
struct FullGrads {
  Tensor<S> dq;  // [N, Hq, dk]
  Tensor<S> dk;  // [N, Hkv, dk]
  Tensor<S> dv;  // [N, Hkv, dv]
};

// Backward of full causal attention (docs/spec.md 6); `fwd` is full_attention(cfg, q, k, v, ...).
template <class S>
FullGrads<S> full_attention_backward(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                                     const FullResult<S>& fwd, const Tensor<S>& dO,
                                     const std::vector<int64_t>& cu_seqlens, Path path = Path::Fast);

// ---- Stages ------------------------------------------------------------------------------------

// Backward of phi (Eq. 7) on one sequence, the twin of compress(): x [T, Hkv, D] (row stride
// Hkv*D) as given to compress, dy = dL/dphi(x) [Nc, Hkv, D]. Adds dL/dx into dx (laid out like
// x) and dL/dparams into dp (tensors shaped like p's, zero-filled by the caller), so that several
// sequences accumulate.
template <class S>
void phi_backward(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p, int64_t hidden,
                       const S* dy, S* dx, PhiParams<S>& dp, Path path = Path::Fast);

}  // namespace nsa::ref
