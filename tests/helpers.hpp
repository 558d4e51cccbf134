// Test helpers: random inputs for a config, relative errors. Shared by every test file.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "nsa_ref.hpp"
#include "rng.hpp"

namespace nsa::test {

template <class S = double>
Tensor<S> randn(Shape shape, Rng& rng, double stddev = 1.0) {
  Tensor<S> t(std::move(shape));
  for (auto& v : t.vec()) v = static_cast<S>(stddev * rng.normal());
  return t;
}

enum class GateMode { Ones, Random, Mlp };

struct Case {
  Config cfg;
  std::vector<int64_t> seqlens = {256};  // one entry per packed sequence
  bool separate_kv = false;
  GateMode gates = GateMode::Random;
  uint64_t seed = 1;
};

// Small paper-shaped default: G = 2, dk != dv, l = 8, d = 4, l' = 8, n = 4, w = 16.
inline Config small_config() {
  Config c;
  c.Hq = 4;
  c.Hkv = 2;
  c.dk = 12;
  c.dv = 8;
  c.cmp_len = 8;
  c.cmp_stride = 4;
  c.slc_len = 8;
  c.slc_count = 4;
  c.init_blocks = 1;
  c.local_blocks = 2;
  c.window = 16;
  c.compress = CompressKind::Mlp;
  return c;
}

template <class S = double>
ref::Inputs<S> make_inputs(const Case& k) {
  const Config& c = k.cfg;
  Rng rng(k.seed);
  ref::Inputs<S> in;
  int64_t N = 0;
  in.cu_seqlens = {0};
  for (int64_t T : k.seqlens) in.cu_seqlens.push_back(N += T);
  if (k.seqlens.size() == 1) in.cu_seqlens.clear();
  in.q = randn<S>({N, c.Hq, c.dk}, rng);
  in.k = randn<S>({N, c.Hkv, c.dk}, rng);
  in.v = randn<S>({N, c.Hkv, c.dv}, rng);
  if (k.separate_kv)
    for (int b = 0; b < kBranches; ++b) {
      in.k_own[b] = randn<S>({N, c.Hkv, c.dk}, rng);
      in.v_own[b] = randn<S>({N, c.Hkv, c.dv}, rng);
    }
  if (k.gates == GateMode::Random) {
    in.gates = Tensor<S>({N, c.Hq, 3});
    for (auto& g : in.gates.vec()) g = static_cast<S>(rng.uniform());
  } else if (k.gates == GateMode::Mlp) {
    const int64_t dm = 10, dh = 6;
    in.gate_mlp.x = randn<S>({N, dm}, rng);
    in.gate_mlp.w0 = randn<S>({dm, dh}, rng, 0.5);
    in.gate_mlp.b0 = randn<S>({dh}, rng, 0.1);
    in.gate_mlp.w = randn<S>({dh, 3 * c.Hq}, rng, 0.5);
    in.gate_mlp.b = randn<S>({3 * c.Hq}, rng, 0.1);
  }
  in.phi = ref::random_compress_params<S>(c, k.seed + 100);
  return in;
}

// The squared norms ||a - b||^2 and ||b||^2 over entries [begin, end), the entries equal in both
// (e.g. -inf lse) in the denominator only if finite; false if a differing entry is not finite.
template <class A, class B>
bool diff_norms(const Tensor<A>& a, const Tensor<B>& b, int64_t begin, int64_t end, double& num, double& den) {
  num = 0, den = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = double(a[i]), y = double(b[i]);
    if (x == y) {
      if (std::isfinite(y)) den += y * y;
      continue;
    }
    if (!std::isfinite(x) || !std::isfinite(y)) return false;
    num += (x - y) * (x - y);
    den += y * y;
  }
  return true;
}

// ||a - b|| / ||b|| over finite entries; entries equal in both (e.g. -inf lse) are skipped.
template <class A, class B>
double rel_l2(const Tensor<A>& a, const Tensor<B>& b) {
  double num = 0, den = 0;
  if (!diff_norms(a, b, 0, a.numel(), num, den)) return std::numeric_limits<double>::infinity();
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The paper's block settings (l = 32, d = 16, l' = 64, n = 16, w = 512, mlp phi) at these heads.
inline Config paper_config(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv) {
  Config c;
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.cmp_len = 32, c.cmp_stride = 16, c.slc_len = 64, c.slc_count = 16, c.window = 512;
  c.compress = CompressKind::Mlp;
  return c;
}

template <class A, class B>
double max_abs(const Tensor<A>& a, const Tensor<B>& b) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = double(a[i]), y = double(b[i]);
    if (x == y) continue;
    m = std::max(m, std::abs(x - y));
  }
  return m;
}

}  // namespace nsa::test
