// Compression phi (NSA-SPEC.md 3, Eq. 7): block i of a sequence covers tokens [i*d, i*d + l);
// phi maps its l rows (keys or values, dim D) to one row.
//   mean:   the mean of the rows;
//   linear: flat = rows + pe, flattened row-major over (token, dim) to l*D; W flat + b;
//   mlp:    W2 act(W1 flat + b1) + b2.
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
template CompressParams<double> random_compress_params<double>(const Config&, uint64_t);
template CompressParams<float> random_compress_params<float>(const Config&, uint64_t);

}  // namespace nsa::ref
