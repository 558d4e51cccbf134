// The exact CPU reference of Native Sparse Attention (docs/spec.md), in double or float.
//
// Everything is computed on packed sequences: N tokens in all, sequence b spanning the rows
// [cu_seqlens[b], cu_seqlens[b+1]) (FlashAttention's convention; a [B, T, ...] batch is the
// packing with cu_seqlens = 0, T, 2T, ...). Sequences never see each other.
//
// Two paths compute the same function (STYLE 3):
//   Path::Oracle  plain loops in the order of the paper's equations (reference/oracle.cpp);
//   Path::Fast    Eigen block products, OpenMP over (sequence, group, query tile); nothing of
//                 size T x T is held per head (reference/forward.cpp).
// They agree to ~1e-13 relative in double. Every intermediate the spec names is returned.
// The backward pass (gradients for training, section 7) is declared in backward.hpp; nsa_ref.hpp
// includes both.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config.hpp"
#include "tensor.hpp"

namespace nsa::ref {

enum class Path { Oracle, Fast };

// Parameters of phi for keys or for values (docs/spec.md 3), per KV head. D is dk for keys and dv
// for values; h_c is Config::hidden_k() / hidden_v(). Only the tensors of the configured kind
// are used: mean uses none; linear pe, w, b; mlp pe, w1, b1, w2, b2.
template <class S>
struct PhiParams {
  Tensor<S> pe;  // [Hkv, l, D]       intra-block position encoding
  Tensor<S> w;   // [Hkv, D, l*D]     linear
  Tensor<S> b;   // [Hkv, D]          linear
  Tensor<S> w1;  // [Hkv, h_c, l*D]   mlp, first layer
  Tensor<S> b1;  // [Hkv, h_c]
  Tensor<S> w2;  // [Hkv, D, h_c]     mlp, second layer
  Tensor<S> b2;  // [Hkv, D]

  template <class U>
  PhiParams<U> cast() const {
    return {pe.template cast<U>(), w.template cast<U>(),  b.template cast<U>(), w1.template cast<U>(),
            b1.template cast<U>(), w2.template cast<U>(), b2.template cast<U>()};
  }
};

template <class S>
struct CompressParams {
  PhiParams<S> k;  // for keys (D = dk)
  PhiParams<S> v;  // for values (D = dv)
  template <class U>
  CompressParams<U> cast() const {
    return {k.template cast<U>(), v.template cast<U>()};
  }
};

// Parameters drawn from a seeded generator (core/rng.hpp), fan-in scaled so compressed keys and
// values have the magnitude of the raw ones: pe ~ N(0, 0.02^2); w ~ N(0, 1/(l*D)); w1 ~ N(0,
// 2/(l*D)); w2 ~ N(0, 1/h_c); biases 0. Keys use the stream of `seed`, values that of seed + 1.
template <class S>
CompressParams<S> random_compress_params(const Config& cfg, uint64_t seed);

// Gates from input features (docs/spec.md 2): g = sigmoid(h W + b), h = x, or h = act(x W0 + b0)
// when w0 is given. Output column h*3 + c is gate c of head h.
template <class S>
struct GateMlp {
  Tensor<S> x;   // [N, d_model]
  Tensor<S> w0;  // [d_model, d_hidden]  optional hidden layer
  Tensor<S> b0;  // [d_hidden]
  Tensor<S> w;   // [d_in, 3*Hq]          d_in = d_hidden if w0 is given, else d_model
  Tensor<S> b;   // [3*Hq]
  Activation act = Activation::Gelu;
  bool given() const { return !w.empty(); }
  template <class U>
  GateMlp<U> cast() const {
    return {x.template cast<U>(), w0.template cast<U>(), b0.template cast<U>(), w.template cast<U>(),
            b.template cast<U>(), act};
  }
};

template <class S>
struct Inputs {
  Tensor<S> q;                             // [N, Hq, dk]
  Tensor<S> k;                             // [N, Hkv, dk]  shared keys (the common shorthand)
  Tensor<S> v;                             // [N, Hkv, dv]
  std::array<Tensor<S>, kBranches> k_own;  // [N, Hkv, dk]  per-branch keys; empty: use k
  std::array<Tensor<S>, kBranches> v_own;  // [N, Hkv, dv]  per-branch values; empty: use v
  Tensor<S> gates;                         // [N, Hq, 3] in [0, 1]; empty: gate_mlp, else all ones
  GateMlp<S> gate_mlp;
  CompressParams<S> phi;                   // unused for compress = mean
  std::vector<int64_t> cu_seqlens;         // [B+1]; empty: one sequence of N tokens

  int64_t N() const { return q.empty() ? 0 : q.dim(0); }
  const Tensor<S>& key(Branch b) const { return k_own[int(b)].empty() ? k : k_own[int(b)]; }
  const Tensor<S>& value(Branch b) const { return v_own[int(b)].empty() ? v : v_own[int(b)]; }
  // True when no branch has keys or values of its own.
  bool all_shared() const {
    for (int c = 0; c < kBranches; ++c)
      if (!k_own[c].empty() || !v_own[c].empty()) return false;
    return true;
  }
  std::vector<int64_t> seqlens_or_single() const {
    return cu_seqlens.empty() ? std::vector<int64_t>{0, N()} : cu_seqlens;
  }
  template <class U>
  Inputs<U> cast() const;
};

// Names a tensor role ("q", "k_cmp", "gates", "phi.w1_k", ...) for error messages; the CLI maps
// roles to file paths. The default prints the role.
using RoleNamer = std::function<std::string(const std::string& role)>;

// Checks every shape against the config and each other, cu_seqlens, gate ranges, and finiteness
// (unless allow_nonfinite). Throws InputError naming the tensor, the index and what was expected.
template <class S>
void check_inputs(const Config& cfg, const Inputs<S>& in, bool allow_nonfinite = false,
                  const RoleNamer& name = nullptr);

template <class S>
struct ForwardResult {
  Tensor<S> o;                               // [N, Hq, dv]  Eq. 5, the gated sum
  std::array<Tensor<S>, kBranches> o_branch;  // [N, Hq, dv]  O_cmp, O_slc, O_win
  std::array<Tensor<S>, kBranches> lse;       // [N, Hq]      ln sum exp(s q.k); -inf if no key
  Tensor<S> gates;                           // [N, Hq, 3]   the gates used
  Tensor<int32_t> block_idx;                 // [N, Hkv, n]  ascending, -1 padding at the end
  Tensor<S> block_scores;                    // [N, Hkv, NB] P of Eq. 10; 0 where invalid;
                                             //   NB = max over sequences of ceil(T_b / l')
  Tensor<S> k_cmp_compressed;                // [Nc_total, Hkv, dk]  phi(k_cmp), per sequence
  Tensor<S> v_cmp_compressed;                // [Nc_total, Hkv, dv]
  std::vector<int64_t> cu_cmp;               // [B+1] offsets of each sequence's compressed rows
};

// The NSA forward pass (docs/spec.md 1-5). Inputs must have passed check_inputs.
template <class S>
ForwardResult<S> forward(const Config& cfg, const Inputs<S>& in, Path path = Path::Fast);

template <class S>
struct FullResult {
  Tensor<S> o;    // [N, Hq, dv]
  Tensor<S> lse;  // [N, Hq]
};

// Causal softmax attention with the same GQA layout (docs/spec.md 6), per packed sequence.
template <class S>
FullResult<S> full_attention(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                             const std::vector<int64_t>& cu_seqlens, Path path = Path::Fast);

// ---- Stages, exposed for the CUDA tests, decoding and the analysis tools -----------------------

// phi (Eq. 7) on one sequence: x [T, Hkv, D] (row stride Hkv*D) -> [Nc, Hkv, D].
template <class S>
Tensor<S> compress(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p,
                   int64_t hidden, Path path = Path::Fast);

// Eq. 9: the selection blocks j that compressed block i overlaps, with |overlap| / d.
struct OverlapTerm {
  int64_t j;
  double w;
};
std::vector<std::vector<OverlapTerm>> overlap_map(const Config& cfg, int64_t Nc);

// Eq. 11 with the forced blocks: the blocks query t selects given the group scores P[j] of its
// valid blocks j < slc_valid(t). Ascending. Ties go to the lower index.
template <class S>
std::vector<int32_t> select_blocks(const Config& cfg, int64_t t, const S* P);

// Gates for every (token, head): the given tensor, the gate MLP, or ones.
template <class S>
Tensor<S> compute_gates(const Config& cfg, const Inputs<S>& in);

// Sets the OpenMP thread count for the fast path (0: all cores) and returns the count in effect.
// Results do not depend on it.
int set_threads(int n);

// ---- Memory, for refusing a run that cannot fit before it allocates anything -----------------
// What a call allocates beyond its inputs, in bytes: the result it returns, and the most working
// memory it holds at once with `threads` threads. Upper bounds from the sizes the code allocates
// (each function sits beside the code it describes); `elem` is sizeof(S).
struct MemoryUse {
  double result = 0;
  double working = 0;
};
// gate_hidden: width of the gate MLP's hidden layer (d_hidden, or d_model without one), 0 when
// the gates are given or all ones.
MemoryUse forward_memory(const Config& cfg, const std::vector<int64_t>& seqlens, int64_t gate_hidden, int elem,
                         int threads, Path path);
MemoryUse full_attention_memory(const Config& cfg, const std::vector<int64_t>& seqlens, int elem, int threads,
                                Path path);
// compress() on one sequence of T tokens: the returned [Nc, Hkv, D] and its working matrices.
double compress_memory(const Config& cfg, int64_t T, int64_t D, int64_t hidden, int elem, Path path);
// Elements of phi's parameters for keys and values (0 for mean).
double compress_param_count(const Config& cfg);

}  // namespace nsa::ref

