// Arithmetic cost of NSA and of full attention: the useful FLOPs every benchmark divides by.
// A visited key costs 2*dk (q.k) + 2*dv (p*v) FLOPs per query head; softmax and masking are not
// counted (the convention of FlashAttention's and the paper's FLOP counts).
#pragma once

#include <cstdint>

#include "config.hpp"

namespace nsa::analysis {

struct ForwardFlops {
  double phi = 0;  // compression phi for keys and values (block products)
  double cmp = 0;  // attention over the visible compressed keys
  double slc = 0;  // attention over the selected tokens
  double win = 0;  // attention over the window
  double total() const { return phi + cmp + slc + win; }
};

// Keys query t attends to in the selection branch: all t+1 tokens while at most n blocks are
// valid, else n-1 full blocks and the part of its own block up to t (the own block is always
// selected when local_blocks >= 1; without forced local blocks this is the upper bound n*l').
int64_t slc_tokens(const Config& cfg, int64_t t);

// phi (Eq. 7) on one block of keys and the same block of values, for one KV head.
double phi_flops_per_block(const Config& cfg);

// One sequence of T tokens, all heads.
ForwardFlops nsa_forward_flops(const Config& cfg, int64_t T);
double full_forward_flops(const Config& cfg, int64_t T);

// The backward pass, same convention: a visited key costs the recomputed scores q.k (2*dk), dP =
// dO.v (2*dv), and dq, dk (2*dk each), dv (2*dv): 6*dk + 4*dv FLOPs per query head, 2.5x the
// forward's for dk = dv (FlashAttention's count). phi costs twice its forward (dW and dx of each
// product; the mlp's recomputed hidden layer is not counted), mean once.
ForwardFlops nsa_backward_flops(const Config& cfg, int64_t T);
double full_backward_flops(const Config& cfg, int64_t T);

}  // namespace nsa::analysis
