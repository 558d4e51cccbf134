// Compression phi (docs/spec.md 3, Eq. 7): block i of a sequence covers tokens [i*d, i*d + l);
// phi maps its l rows (keys or values, dim D) to one row.
//   mean:   the mean of the rows;
//   linear: flat = rows + pe, flattened row-major over (token, dim) to l*D; W flat + b;
//   mlp:    W2 act(W1 flat + b1) + b2.
// And phi's backward (docs/spec.md 7): the gradient of a compressed row goes to the l raw rows of
// its block (overlapping blocks add up) and to the parameters.
#include <omp.h>

#include "common.hpp"
#include "nsa_ref.hpp"
#include "rng.hpp"

namespace nsa::ref {

namespace {

// The oracle: one block at a time, in the words of the spec.
template <class S>
void compress_oracle(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p,
                     int64_t hc, Tensor<S>& out) {
  const int64_t H = cfg.Hkv, l = cfg.cmp_len, d = cfg.cmp_stride, Nc = cfg.num_cmp_blocks(T);
  std::vector<S> flat(static_cast<size_t>(l * D)), hid(static_cast<size_t>(hc));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Nc; ++i) {
      S* y = out.row(i, h);
      for (int64_t r = 0; r < l; ++r)
        for (int64_t c = 0; c < D; ++c) {
          const S xv = x[((i * d + r) * H + h) * D + c];
          flat[r * D + c] = cfg.compress == CompressKind::Mean ? xv : xv + p.pe(h, r, c);
        }
      if (cfg.compress == CompressKind::Mean) {
        for (int64_t c = 0; c < D; ++c) {
          S s = 0;
          for (int64_t r = 0; r < l; ++r) s += flat[r * D + c];
          y[c] = s / S(l);
        }
      } else if (cfg.compress == CompressKind::Linear) {
        for (int64_t c = 0; c < D; ++c) {
          S s = p.b(h, c);
          for (int64_t m = 0; m < l * D; ++m) s += p.w(h, c, m) * flat[m];
          y[c] = s;
        }
      } else {
        for (int64_t a = 0; a < hc; ++a) {
          S s = p.b1(h, a);
          for (int64_t m = 0; m < l * D; ++m) s += p.w1(h, a, m) * flat[m];
          hid[a] = activate(cfg.cmp_act, s);
        }
        for (int64_t c = 0; c < D; ++c) {
          S s = p.b2(h, c);
          for (int64_t a = 0; a < hc; ++a) s += p.w2(h, c, a) * hid[a];
          y[c] = s;
        }
      }
    }
}

// The fast path: per head, all blocks at once as one [Nc, l*D] matrix times the weights.
template <class S>
void compress_fast(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p, int64_t hc,
                   Tensor<S>& out) {
  const int64_t H = cfg.Hkv, l = cfg.cmp_len, d = cfg.cmp_stride, Nc = cfg.num_cmp_blocks(T);
  if (Nc == 0) return;
  for (int64_t h = 0; h < H; ++h) {
    Eigen::Map<Mat<S>, 0, Eigen::OuterStride<>> y(out.row(0, h), Nc, D, Eigen::OuterStride<>(H * D));
    if (cfg.compress == CompressKind::Mean) {
      // Mean of l rows: a running sum down each block would be faster but would change the
      // rounding against the oracle; l is small, so sum in the oracle's order.
      for (int64_t i = 0; i < Nc; ++i) {
        auto blk = head_rows(x, H, D, h, i * d, l);
        for (int64_t c = 0; c < D; ++c) {
          S s = 0;
          for (int64_t r = 0; r < l; ++r) s += blk(r, c);
          y(i, c) = s / S(l);
        }
      }
      continue;
    }
    // X[i, r*D + c] = x[i*d + r, h, c] + pe[h, r, c]: blocks overlap when d < l, so gather.
    Mat<S> X(Nc, l * D);
    Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> pe(p.pe.data() + h * l * D, l * D);
    for (int64_t i = 0; i < Nc; ++i)
      for (int64_t r = 0; r < l; ++r)
        X.row(i).segment(r * D, D) = head_rows(x, H, D, h, i * d + r, 1).row(0);
    X.rowwise() += pe;
    if (cfg.compress == CompressKind::Linear) {
      Eigen::Map<const Mat<S>> W(p.w.data() + h * D * l * D, D, l * D);
      Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> b(p.b.data() + h * D, D);
      y.noalias() = X * W.transpose();
      y.rowwise() += b;
    } else {
      Eigen::Map<const Mat<S>> W1(p.w1.data() + h * hc * l * D, hc, l * D), W2(p.w2.data() + h * D * hc, D, hc);
      Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> b1(p.b1.data() + h * hc, hc), b2(p.b2.data() + h * D, D);
      Mat<S> Hd = X * W1.transpose();
      Hd.rowwise() += b1;
      Hd = Hd.unaryExpr([a = cfg.cmp_act](S z) { return activate(a, z); });
      y.noalias() = Hd * W2.transpose();
      y.rowwise() += b2;
    }
  }
}

}  // namespace

template <class S>
Tensor<S> compress(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p, int64_t hidden,
                   Path path) {
  Tensor<S> out({cfg.num_cmp_blocks(T), cfg.Hkv, D});
  if (path == Path::Oracle)
    compress_oracle(cfg, x, T, D, p, hidden, out);
  else
    compress_fast(cfg, x, T, D, p, hidden, out);
  return out;
}

namespace {

// The oracle of phi's backward: one block at a time, the forward's loops run backwards.
//   mean:   dx[i d + r] += dy[i] / l;
//   linear: dW += dy flat^T, db += dy, dflat = W^T dy;
//   mlp:    a = W1 flat + b1; dW2 += dy act(a)^T, db2 += dy, da = (W2^T dy) * act'(a),
//           dW1 += da flat^T, db1 += da, dflat = W1^T da;
// then dpe += dflat and dx[i d + r, c] += dflat[r D + c] (flat = block + pe).
template <class S>
void compress_backward_oracle(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p,
                              int64_t hc, const S* dy, S* dx, PhiParams<S>& dp) {
  const int64_t H = cfg.Hkv, l = cfg.cmp_len, d = cfg.cmp_stride, Nc = cfg.num_cmp_blocks(T);
  std::vector<S> flat(static_cast<size_t>(l * D)), dflat(static_cast<size_t>(l * D)), pre(static_cast<size_t>(hc)),
      dpre(static_cast<size_t>(hc));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Nc; ++i) {
      const S* g = dy + (i * H + h) * D;  // dL/dy for block i, head h
      if (cfg.compress == CompressKind::Mean) {
        for (int64_t r = 0; r < l; ++r)
          for (int64_t c = 0; c < D; ++c) dx[((i * d + r) * H + h) * D + c] += g[c] / S(l);
        continue;
      }
      for (int64_t r = 0; r < l; ++r)
        for (int64_t c = 0; c < D; ++c) flat[r * D + c] = x[((i * d + r) * H + h) * D + c] + p.pe(h, r, c);
      std::fill(dflat.begin(), dflat.end(), S(0));
      if (cfg.compress == CompressKind::Linear) {
        for (int64_t c = 0; c < D; ++c) {
          dp.b(h, c) += g[c];
          for (int64_t m = 0; m < l * D; ++m) {
            dp.w(h, c, m) += g[c] * flat[m];
            dflat[m] += p.w(h, c, m) * g[c];
          }
        }
      } else {
        for (int64_t a = 0; a < hc; ++a) {
          S s = p.b1(h, a);
          for (int64_t m = 0; m < l * D; ++m) s += p.w1(h, a, m) * flat[m];
          pre[a] = s;
        }
        for (int64_t a = 0; a < hc; ++a) {
          S s = 0;
          for (int64_t c = 0; c < D; ++c) {
            dp.w2(h, c, a) += g[c] * activate(cfg.cmp_act, pre[a]);
            s += p.w2(h, c, a) * g[c];
          }
          dpre[a] = s * activate_grad(cfg.cmp_act, pre[a]);
        }
        for (int64_t c = 0; c < D; ++c) dp.b2(h, c) += g[c];
        for (int64_t a = 0; a < hc; ++a) {
          dp.b1(h, a) += dpre[a];
          for (int64_t m = 0; m < l * D; ++m) {
            dp.w1(h, a, m) += dpre[a] * flat[m];
            dflat[m] += p.w1(h, a, m) * dpre[a];
          }
        }
      }
      for (int64_t r = 0; r < l; ++r)
        for (int64_t c = 0; c < D; ++c) {
          dp.pe(h, r, c) += dflat[r * D + c];
          dx[((i * d + r) * H + h) * D + c] += dflat[r * D + c];
        }
    }
}

// The fast path: per head, all blocks at once, as in compress_fast. Heads are independent (their
// own rows of x and their own slices of the parameters), so they run in parallel; within a head
// the overlapping blocks add into dx in block order, so the result does not depend on threads.
template <class S>
void compress_backward_fast(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p, int64_t hc,
                            const S* dy, S* dx, PhiParams<S>& dp) {
  const int64_t H = cfg.Hkv, l = cfg.cmp_len, d = cfg.cmp_stride, Nc = cfg.num_cmp_blocks(T);
  if (Nc == 0) return;
  using RowV = Eigen::Matrix<S, 1, Eigen::Dynamic>;
#pragma omp parallel for schedule(static) if (H > 1)
  for (int64_t h = 0; h < H; ++h) {
    Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>> dY(dy + h * D, Nc, D, Eigen::OuterStride<>(H * D));
    auto dx_row = [&](int64_t t) { return Eigen::Map<RowV>(dx + (t * H + h) * D, D); };
    if (cfg.compress == CompressKind::Mean) {
      for (int64_t i = 0; i < Nc; ++i) {
        const RowV gi = dY.row(i) / S(l);
        for (int64_t r = 0; r < l; ++r) dx_row(i * d + r) += gi;
      }
      continue;
    }
    Mat<S> X(Nc, l * D);
    Eigen::Map<const RowV> pe(p.pe.data() + h * l * D, l * D);
    for (int64_t i = 0; i < Nc; ++i)
      for (int64_t r = 0; r < l; ++r) X.row(i).segment(r * D, D) = head_rows(x, H, D, h, i * d + r, 1).row(0);
    X.rowwise() += pe;
    Mat<S> dX;  // [Nc, l*D]  dL/dflat
    if (cfg.compress == CompressKind::Linear) {
      Eigen::Map<const Mat<S>> W(p.w.data() + h * D * l * D, D, l * D);
      Eigen::Map<Mat<S>>(dp.w.data() + h * D * l * D, D, l * D).noalias() += dY.transpose() * X;
      Eigen::Map<RowV>(dp.b.data() + h * D, D) += dY.colwise().sum();
      dX.noalias() = dY * W;
    } else {
      Eigen::Map<const Mat<S>> W1(p.w1.data() + h * hc * l * D, hc, l * D), W2(p.w2.data() + h * D * hc, D, hc);
      Eigen::Map<const RowV> b1(p.b1.data() + h * hc, hc);
      Mat<S> A = X * W1.transpose();  // [Nc, h_c] pre-activations
      A.rowwise() += b1;
      const Mat<S> Hd = A.unaryExpr([a = cfg.cmp_act](S z) { return activate(a, z); });
      Eigen::Map<Mat<S>>(dp.w2.data() + h * D * hc, D, hc).noalias() += dY.transpose() * Hd;
      Eigen::Map<RowV>(dp.b2.data() + h * D, D) += dY.colwise().sum();
      Mat<S> dA = dY * W2;
      dA.array() *= A.unaryExpr([a = cfg.cmp_act](S z) { return activate_grad(a, z); }).array();
      Eigen::Map<Mat<S>>(dp.w1.data() + h * hc * l * D, hc, l * D).noalias() += dA.transpose() * X;
      Eigen::Map<RowV>(dp.b1.data() + h * hc, hc) += dA.colwise().sum();
      dX.noalias() = dA * W1;
    }
    Eigen::Map<RowV>(dp.pe.data() + h * l * D, l * D) += dX.colwise().sum();
    for (int64_t i = 0; i < Nc; ++i)
      for (int64_t r = 0; r < l; ++r) dx_row(i * d + r) += dX.row(i).segment(r * D, D);
  }
}

}  // namespace

template <class S>
void phi_backward(const Config& cfg, const S* x, int64_t T, int64_t D, const PhiParams<S>& p, int64_t hidden,
                       const S* dy, S* dx, PhiParams<S>& dp, Path path) {
  if (path == Path::Oracle)
    compress_backward_oracle(cfg, x, T, D, p, hidden, dy, dx, dp);
  else
    compress_backward_fast(cfg, x, T, D, p, hidden, dy, dx, dp);
}

namespace {
template <class S>
PhiParams<S> random_phi(const Config& cfg, int64_t D, int64_t hc, uint64_t seed) {
  Rng rng(seed);
  const int64_t H = cfg.Hkv, l = cfg.cmp_len;
  auto draw = [&](Shape shape, double stddev) {
    Tensor<S> t(std::move(shape));
    for (auto& v : t.vec()) v = static_cast<S>(stddev * rng.normal());
    return t;
  };
  PhiParams<S> p;
  if (cfg.compress == CompressKind::Mean) return p;
  p.pe = draw({H, l, D}, 0.02);
  if (cfg.compress == CompressKind::Linear) {
    p.w = draw({H, D, l * D}, 1.0 / std::sqrt(double(l * D)));
    p.b = Tensor<S>({H, D});
  } else {
    p.w1 = draw({H, hc, l * D}, std::sqrt(2.0 / double(l * D)));
    p.b1 = Tensor<S>({H, hc});
    p.w2 = draw({H, D, hc}, 1.0 / std::sqrt(double(hc)));
    p.b2 = Tensor<S>({H, D});
  }
  return p;
}
}  // namespace

template <class S>
CompressParams<S> random_compress_params(const Config& cfg, uint64_t seed) {
  return {random_phi<S>(cfg, cfg.dk, cfg.hidden_k(), seed), random_phi<S>(cfg, cfg.dv, cfg.hidden_v(), seed + 1)};
}

double compress_memory(const Config& cfg, int64_t T, int64_t D, int64_t hidden, int elem, Path path) {
  const double Nc = double(cfg.num_cmp_blocks(T)), lD = double(cfg.cmp_len) * double(D), e = elem;
  const double out = e * Nc * double(cfg.Hkv) * double(D);
  if (cfg.compress == CompressKind::Mean) return out;
  if (path == Path::Oracle) return out + e * (lD + double(hidden));  // flat [l*D], hid [h_c]
  // compress_fast, one head at a time: X [Nc, l*D], and for mlp the hidden layer [Nc, h_c] with
  // the product's temporary.
  return out + e * Nc * (lD + (cfg.compress == CompressKind::Mlp ? 2.0 * double(hidden) : 0.0));
}

double compress_param_count(const Config& cfg) {
  const double H = double(cfg.Hkv), l = double(cfg.cmp_len);
  double total = 0;
  for (int kv = 0; kv < 2; ++kv) {
    const double D = double(kv ? cfg.dv : cfg.dk), hc = double(kv ? cfg.hidden_v() : cfg.hidden_k());
    if (cfg.compress == CompressKind::Linear) total += H * (l * D + D * l * D + D);  // pe, w, b
    if (cfg.compress == CompressKind::Mlp) total += H * (l * D + hc * l * D + hc + D * hc + D);  // pe, w1, b1, w2, b2
  }
  return total;
}

template Tensor<double> compress(const Config&, const double*, int64_t, int64_t, const PhiParams<double>&, int64_t,
                                 Path);
template Tensor<float> compress(const Config&, const float*, int64_t, int64_t, const PhiParams<float>&, int64_t,
                                Path);
template void phi_backward(const Config&, const double*, int64_t, int64_t, const PhiParams<double>&, int64_t,
                                const double*, double*, PhiParams<double>&, Path);
template void phi_backward(const Config&, const float*, int64_t, int64_t, const PhiParams<float>&, int64_t,
                                const float*, float*, PhiParams<float>&, Path);
template CompressParams<double> random_compress_params<double>(const Config&, uint64_t);
template CompressParams<float> random_compress_params<float>(const Config&, uint64_t);

}  // namespace nsa::ref
