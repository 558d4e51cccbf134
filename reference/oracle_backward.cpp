// The oracle of the backward pass (docs/spec.md 7): plain loops, one query and head at a time,
// the forward oracle's loops with each softmax recomputed from its scores and differentiated.
// Only the selected blocks are taken from the forward pass (they are held fixed); everything
// else is recomputed here, so the fast path (backward.cpp), which reuses the forward's lse,
// outputs and compressed keys, is checked against an independent computation.
#include <algorithm>
#include <cmath>

#include "common.hpp"
#include "oracle.hpp"

namespace nsa::ref {

namespace {

// Backward of one softmax attention (the forward oracle's attend) for the output gated by
// `gate`. Recomputes P_u = softmax(s q.k_u) and O_c = sum_u P_u v_u; returns dL/dgate =
// <dout, O_c>; with dO_c = gate * dout, D = dO_c . O_c and dS_u = P_u (dO_c . v_u - D), adds
//   dq += s sum_u dS_u k_u,   dk_u += s dS_u q,   dv_u += P_u dO_c.
template <class S>
S attend_backward(const S* q, const std::vector<const S*>& keys, const std::vector<const S*>& vals, const S* dout,
                  S gate, int64_t dk, int64_t dv, S scale, S* dq, const std::vector<S*>& dkeys,
                  const std::vector<S*>& dvals) {
  if (keys.empty()) return 0;  // O_c = 0 (t < l - 1 in the compression branch)
  const size_t n = keys.size();
  std::vector<S> p(n), o(static_cast<size_t>(dv), S(0)), dOc(static_cast<size_t>(dv));
  S mx = neg_inf<S>();
  for (size_t u = 0; u < n; ++u) mx = std::max(mx, p[u] = scale * dot(q, keys[u], dk));
  S sum = 0;
  for (size_t u = 0; u < n; ++u) sum += (p[u] = std::exp(p[u] - mx));
  for (size_t u = 0; u < n; ++u) {
    p[u] /= sum;
    for (int64_t c = 0; c < dv; ++c) o[c] += p[u] * vals[u][c];
  }
  const S dgate = dot(dout, o.data(), dv);
  for (int64_t c = 0; c < dv; ++c) dOc[c] = gate * dout[c];
  const S D = dot(dOc.data(), o.data(), dv);
  for (size_t u = 0; u < n; ++u) {
    const S ds = p[u] * (dot(dOc.data(), vals[u], dv) - D);
    for (int64_t a = 0; a < dk; ++a) {
      dq[a] += scale * ds * keys[u][a];
      dkeys[u][a] += scale * ds * q[a];
    }
    for (int64_t c = 0; c < dv; ++c) dvals[u][c] += p[u] * dOc[c];
  }
  return dgate;
}

}  // namespace

template <class S>
void oracle_backward_seq(const Config& cfg, const Inputs<S>& in, const ForwardResult<S>& fwd, const Tensor<S>& dO,
                         int64_t t0, int64_t T, int64_t cmp0, BackwardResult<S>& r) {
  const int64_t Hkv = cfg.Hkv, G = cfg.G(), dk = cfg.dk, dv = cfg.dv, n = cfg.slc_count, ls = cfg.slc_len;
  const S scale = static_cast<S>(cfg.softmax_scale());
  const int64_t Nc = cfg.num_cmp_blocks(T);

  // Eq. 7, recomputed, and the gradients of its outputs, filled by the compression branch below.
  const Tensor<S> kc = compress(cfg, in.key(Branch::Cmp).row(t0, 0), T, dk, in.phi.k, cfg.hidden_k(), Path::Oracle);
  const Tensor<S> vc = compress(cfg, in.value(Branch::Cmp).row(t0, 0), T, dv, in.phi.v, cfg.hidden_v(), Path::Oracle);
  Tensor<S> dkc({Nc, Hkv, dk}), dvc({Nc, Hkv, dv});

  std::vector<const S*> ks, vs;
  std::vector<S*> dks, dvs;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t0 + t;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const S* q = in.q.row(row, h);
        const S* dout = dO.row(row, h);
        S* dq = r.dq.row(row, h);
        auto run = [&](Branch b) {
          const int c = int(b);
          r.dgates(row, h, c) = attend_backward(q, ks, vs, dout, fwd.gates(row, h, c), dk, dv, scale, dq, dks, dvs);
          ks.clear(), vs.clear(), dks.clear(), dvs.clear();
        };
        // Compression branch: the visible compressed blocks, i*d + l - 1 <= t.
        for (int64_t i = 0; i < cfg.cmp_visible(t); ++i) {
          ks.push_back(kc.row(i, g)), vs.push_back(vc.row(i, g));
          dks.push_back(dkc.row(i, g)), dvs.push_back(dvc.row(i, g));
        }
        run(Branch::Cmp);
        // Selection branch: tokens u <= t of the group's selected blocks, held fixed.
        for (int64_t m = 0; m < n; ++m) {
          const int64_t j = fwd.block_idx(row, g, m);
          if (j < 0) continue;
          for (int64_t u = j * ls; u < std::min((j + 1) * ls, t + 1); ++u) {
            ks.push_back(in.key(Branch::Slc).row(t0 + u, g)), vs.push_back(in.value(Branch::Slc).row(t0 + u, g));
            dks.push_back(r.dk_branch[1].row(t0 + u, g)), dvs.push_back(r.dv_branch[1].row(t0 + u, g));
          }
        }
        run(Branch::Slc);
        // Sliding window: keys [max(0, t - w + 1), t].
        for (int64_t u = cfg.win_start(t); u <= t; ++u) {
          ks.push_back(in.key(Branch::Win).row(t0 + u, g)), vs.push_back(in.value(Branch::Win).row(t0 + u, g));
          dks.push_back(r.dk_branch[2].row(t0 + u, g)), dvs.push_back(r.dv_branch[2].row(t0 + u, g));
        }
        run(Branch::Win);
      }
  }
  std::copy(dkc.vec().begin(), dkc.vec().end(), r.dk_cmp_compressed.row(cmp0, 0));
  std::copy(dvc.vec().begin(), dvc.vec().end(), r.dv_cmp_compressed.row(cmp0, 0));
  // Through phi (Eq. 7) to the raw compression-branch keys and values and phi's parameters.
  phi_backward(cfg, in.key(Branch::Cmp).row(t0, 0), T, dk, in.phi.k, cfg.hidden_k(), dkc.data(),
                    r.dk_branch[0].row(t0, 0), r.dphi.k, Path::Oracle);
  phi_backward(cfg, in.value(Branch::Cmp).row(t0, 0), T, dv, in.phi.v, cfg.hidden_v(), dvc.data(),
                    r.dv_branch[0].row(t0, 0), r.dphi.v, Path::Oracle);
}

template <class S>
void oracle_full_backward_seq(const Config& cfg, const Tensor<S>& q, const Tensor<S>& k, const Tensor<S>& v,
                              const Tensor<S>& dO, int64_t t0, int64_t T, FullGrads<S>& r) {
  const int64_t G = cfg.G();
  const S scale = static_cast<S>(cfg.softmax_scale());
  std::vector<const S*> ks, vs;
  std::vector<S*> dks, dvs;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < cfg.Hq; ++h) {
      ks.clear(), vs.clear(), dks.clear(), dvs.clear();
      for (int64_t u = 0; u <= t; ++u) {
        ks.push_back(k.row(t0 + u, h / G)), vs.push_back(v.row(t0 + u, h / G));
        dks.push_back(r.dk.row(t0 + u, h / G)), dvs.push_back(r.dv.row(t0 + u, h / G));
      }
      attend_backward(q.row(t0 + t, h), ks, vs, dO.row(t0 + t, h), S(1), cfg.dk, cfg.dv, scale, r.dq.row(t0 + t, h),
                      dks, dvs);
    }
}

// g = sigmoid(z), z = hid W + b, hid = act(a) with a = x W0 + b0 (or hid = x). In the order:
// dz = dg g (1 - g); dW = hid^T dz, db = sum_t dz, dhid = dz W^T; da = dhid act'(a),
// dW0 = x^T da, db0 = sum_t da, dx = da W0^T (or dx = dhid).
template <class S>
void oracle_gate_mlp_backward(const Config& cfg, const GateMlp<S>& m, const Tensor<S>& gates, BackwardResult<S>& r) {
  const int64_t N = m.x.dim(0), dm = m.x.dim(1), Z = 3 * cfg.Hq;
  const bool hidden = !m.w0.empty();
  const int64_t din = hidden ? m.w0.dim(1) : dm;
  GateMlpGrads<S>& d = r.dgate_mlp;
  d.x = Tensor<S>({N, dm});
  d.w = Tensor<S>({din, Z});
  d.b = Tensor<S>({Z});
  if (hidden) d.w0 = Tensor<S>({dm, din}), d.b0 = Tensor<S>({din});
  std::vector<S> a(static_cast<size_t>(din)), hid(static_cast<size_t>(din)), dz(static_cast<size_t>(Z)),
      dhid(static_cast<size_t>(din));
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t e = 0; e < din; ++e) {
      if (hidden) {
        S s = m.b0[e];
        for (int64_t i = 0; i < dm; ++i) s += m.x(t, i) * m.w0(i, e);
        a[e] = s;
        hid[e] = activate(m.act, s);
      } else {
        hid[e] = m.x(t, e);
      }
    }
    for (int64_t z = 0; z < Z; ++z) {
      const S g = gates[t * Z + z];  // column h*3 + c is gates[t, h, c]
      dz[z] = r.dgates[t * Z + z] * g * (S(1) - g);
      d.b[z] += dz[z];
    }
    for (int64_t e = 0; e < din; ++e) {
      S s = 0;
      for (int64_t z = 0; z < Z; ++z) {
        d.w(e, z) += hid[e] * dz[z];
        s += dz[z] * m.w(e, z);
      }
      dhid[e] = s;
    }
    if (!hidden) {
      for (int64_t i = 0; i < dm; ++i) d.x(t, i) = dhid[i];
      continue;
    }
    for (int64_t e = 0; e < din; ++e) {
      const S da = dhid[e] * activate_grad(m.act, a[e]);
      d.b0[e] += da;
      for (int64_t i = 0; i < dm; ++i) {
        d.w0(i, e) += m.x(t, i) * da;
        d.x(t, i) += da * m.w0(i, e);
      }
    }
  }
}

template void oracle_backward_seq<double>(const Config&, const Inputs<double>&, const ForwardResult<double>&,
                                          const Tensor<double>&, int64_t, int64_t, int64_t, BackwardResult<double>&);
template void oracle_backward_seq<float>(const Config&, const Inputs<float>&, const ForwardResult<float>&,
                                         const Tensor<float>&, int64_t, int64_t, int64_t, BackwardResult<float>&);
template void oracle_full_backward_seq<double>(const Config&, const Tensor<double>&, const Tensor<double>&,
                                               const Tensor<double>&, const Tensor<double>&, int64_t, int64_t,
                                               FullGrads<double>&);
template void oracle_full_backward_seq<float>(const Config&, const Tensor<float>&, const Tensor<float>&,
                                              const Tensor<float>&, const Tensor<float>&, int64_t, int64_t,
                                              FullGrads<float>&);
template void oracle_gate_mlp_backward<double>(const Config&, const GateMlp<double>&, const Tensor<double>&,
                                               BackwardResult<double>&);
template void oracle_gate_mlp_backward<float>(const Config&, const GateMlp<float>&, const Tensor<float>&,
                                              BackwardResult<float>&);

}  // namespace nsa::ref
