// Internal helpers of the reference: activations, Eigen maps over the [T, H, D] layout.
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <limits>
#include <type_traits>

#include "config.hpp"
#include "tensor.hpp"

namespace nsa::ref {

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
// Rows of one head of a [T, H, D] tensor: row t is at base + t*H*D, so the row stride is H*D.
template <class S>
using HeadRows = Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>>;

template <class S>
HeadRows<S> head_rows(const S* x, int64_t H, int64_t D, int64_t head, int64_t t0, int64_t rows) {
  return HeadRows<S>(x + (t0 * H + head) * D, rows, D, Eigen::OuterStride<>(H * D));
}

template <class S>
constexpr S neg_inf() {
  return -std::numeric_limits<S>::infinity();
}

template <class S>
S sigmoid(S z) {
  return z >= 0 ? S(1) / (S(1) + std::exp(-z)) : std::exp(z) / (S(1) + std::exp(z));
}

// act(x) and act'(x) for the hidden layers of phi = mlp and of the gate MLP.
template <class S>
S activate(Activation a, S x) {
  switch (a) {
    case Activation::Gelu: return S(0.5) * x * (S(1) + std::erf(x / std::sqrt(S(2))));
    case Activation::GeluTanh: {
      const S c = std::sqrt(S(2) / S(M_PI));
      return S(0.5) * x * (S(1) + std::tanh(c * (x + S(0.044715) * x * x * x)));
    }
    case Activation::Relu: return x > 0 ? x : S(0);
    case Activation::Silu: return x * sigmoid(x);
  }
  return x;
}

template <class S>
S activate_grad(Activation a, S x) {
  switch (a) {
    case Activation::Gelu: {
      const S cdf = S(0.5) * (S(1) + std::erf(x / std::sqrt(S(2))));
      const S pdf = std::exp(S(-0.5) * x * x) / std::sqrt(S(2) * S(M_PI));
      return cdf + x * pdf;
    }
    case Activation::GeluTanh: {
      const S c = std::sqrt(S(2) / S(M_PI));
      const S u = c * (x + S(0.044715) * x * x * x), th = std::tanh(u);
      return S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th * th) * c * (S(1) + S(3) * S(0.044715) * x * x);
    }
    case Activation::Relu: return x > 0 ? S(1) : S(0);
    case Activation::Silu: {
      const S s = sigmoid(x);
      return s * (S(1) + x * (S(1) - s));
    }
  }
  return S(1);
}

// A tile of the fast paths: the G query heads of one KV group for consecutive positions, as rows
// of one matrix, so every product against the group's keys is shared by its heads (the paper's
// group-centric layout, here for Eigen's GEMM).
struct TileRows {
  int64_t t0, t1, G;  // sequence-local positions [t0, t1); row r is position t0 + r / G
  int64_t pos(int64_t r) const { return t0 + r / G; }
  int64_t rows() const { return (t1 - t0) * G; }
};

// The tile's rows of a [N, Hq, D] tensor (queries, outputs, their gradients): row (t - t0)*G + hi
// is x[row0 + t, g*G + hi, :].
template <class S>
Mat<S> gather_queries(const Tensor<S>& x, int64_t row0, const TileRows& tr, int64_t g, int64_t D) {
  Mat<S> X(tr.rows(), D);
  for (int64_t t = tr.t0; t < tr.t1; ++t)
    X.middleRows((t - tr.t0) * tr.G, tr.G) =
        Eigen::Map<const Mat<S>>(x.row(row0 + t, g * tr.G), tr.G, D);  // a group's heads are adjacent
  return X;
}

// combine (Eq. 5) for one token row of a result R (ForwardResult or StepResult): o = the gates'
// sum of the branch outputs, in branch order.
template <class R>
void combine_row(R& r, int64_t row, int64_t Hq, int64_t dv) {
  for (int64_t h = 0; h < Hq; ++h) {
    auto* o = r.o.row(row, h);
    for (int64_t c = 0; c < dv; ++c) {
      std::decay_t<decltype(r.o[0])> s = 0;
      for (int b = 0; b < kBranches; ++b) s += r.gates(row, h, b) * r.o_branch[b](row, h, c);
      o[c] = s;
    }
  }
}

}  // namespace nsa::ref
