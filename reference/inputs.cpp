// Input checks (shapes, sequences, gate range, finiteness) and the gates (docs/spec.md 2).
#include <omp.h>

#include <cmath>

#include "common.hpp"
#include "nsa_ref.hpp"

namespace nsa::ref {

template <class S>
template <class U>
Inputs<U> Inputs<S>::cast() const {
  Inputs<U> o;
  o.q = q.template cast<U>();
  o.k = k.template cast<U>();
  o.v = v.template cast<U>();
  for (int c = 0; c < kBranches; ++c) {
    o.k_own[c] = k_own[c].template cast<U>();
    o.v_own[c] = v_own[c].template cast<U>();
  }
  o.gates = gates.template cast<U>();
  o.gate_mlp = gate_mlp.template cast<U>();
  o.phi = phi.template cast<U>();
  o.cu_seqlens = cu_seqlens;
  return o;
}
template Inputs<float> Inputs<double>::cast<float>() const;
template Inputs<double> Inputs<float>::cast<double>() const;
template Inputs<double> Inputs<double>::cast<double>() const;
template Inputs<float> Inputs<float>::cast<float>() const;

namespace {

template <class S>
struct Checker {
  const RoleNamer& namer;
  bool allow_nonfinite;
  std::string name(const std::string& role) const { return namer ? namer(role) : role; }

  void shape(const std::string& role, const Tensor<S>& t, const Shape& want, const std::string& meaning) const {
    if (t.shape() != want)
      throw InputError(cat(name(role), ": shape ", shape_str(t.shape()), ", expected ", shape_str(want), " (",
                           meaning, ")"));
  }
  void finite(const std::string& role, const Tensor<S>& t) const {
    if (allow_nonfinite) return;
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(t[i]))
        throw InputError(cat(name(role), ": non-finite value ", value_str(double(t[i])), " at index ", index_str(t.shape(), i),
                             " (pass --allow-nonfinite to let NaN/Inf through)"));
  }
  void both(const std::string& role, const Tensor<S>& t, const Shape& want, const std::string& meaning) const {
    shape(role, t, want, meaning);
    finite(role, t);
  }
};

}  // namespace

template <class S>
void check_inputs(const Config& cfg, const Inputs<S>& in, bool allow_nonfinite, const RoleNamer& namer) {
  cfg.validate();
  const Checker<S> ck{namer, allow_nonfinite};
  const int64_t N = in.N();
  if (in.q.rank() != 3) throw InputError(cat(ck.name("q"), ": rank ", in.q.rank(), ", expected [N, Hq, dk]"));
  ck.both("q", in.q, {N, cfg.Hq, cfg.dk}, "[N, Hq, dk]");
  ck.both("k", in.k, {N, cfg.Hkv, cfg.dk}, "[N, Hkv, dk], N as in q");
  ck.both("v", in.v, {N, cfg.Hkv, cfg.dv}, "[N, Hkv, dv], N as in q");
  for (int c = 0; c < kBranches; ++c) {
    const std::string b = branch_name(Branch(c));
    if (!in.k_own[c].empty()) ck.both("k_" + b, in.k_own[c], {N, cfg.Hkv, cfg.dk}, "[N, Hkv, dk] like k");
    if (!in.v_own[c].empty()) ck.both("v_" + b, in.v_own[c], {N, cfg.Hkv, cfg.dv}, "[N, Hkv, dv] like v");
  }
  if (!in.gates.empty()) {
    ck.shape("gates", in.gates, {N, cfg.Hq, 3}, "[N, Hq, 3] in the order cmp, slc, win");
    ck.finite("gates", in.gates);
    for (int64_t i = 0; i < in.gates.numel(); ++i) {
      const S g = in.gates[i];
      if (!std::isfinite(g)) continue;  // allowed: checked just above
      if (!(g >= 0 && g <= 1))
        throw InputError(cat(ck.name("gates"), ": value ", g, " at index ", index_str(in.gates.shape(), i),
                             " is outside [0, 1] (gates are sigmoids)"));
    }
  } else if (in.gate_mlp.given()) {
    const auto& m = in.gate_mlp;
    if (m.x.rank() != 2 || m.x.dim(0) != N)
      throw InputError(cat(ck.name("gate_x"), ": shape ", shape_str(m.x.shape()), ", expected [N = ", N,
                           ", d_model]"));
    ck.finite("gate_x", m.x);
    int64_t din = m.x.dim(1);
    if (!m.w0.empty()) {
      if (m.w0.rank() != 2 || m.w0.dim(0) != din)
        throw InputError(cat(ck.name("gate_w0"), ": shape ", shape_str(m.w0.shape()), ", expected [d_model = ",
                             din, ", d_hidden]"));
      ck.finite("gate_w0", m.w0);
      const int64_t dh = m.w0.dim(1);
      if (m.b0.empty()) throw InputError(cat(ck.name("gate_b0"), ": missing (needed with gate_w0)"));
      ck.both("gate_b0", m.b0, {dh}, "[d_hidden]");
      din = dh;
    }
    ck.both("gate_w", m.w, {din, 3 * cfg.Hq}, "[d_in, 3*Hq], column h*3+c is gate c of head h");
    if (m.b.empty()) throw InputError(cat(ck.name("gate_b"), ": missing (needed with gate_w)"));
    ck.both("gate_b", m.b, {3 * cfg.Hq}, "[3*Hq]");
  }
  if (cfg.compress != CompressKind::Mean) {
    const int64_t H = cfg.Hkv, l = cfg.cmp_len;
    for (int kv = 0; kv < 2; ++kv) {
      const PhiParams<S>& p = kv ? in.phi.v : in.phi.k;
      const int64_t D = kv ? cfg.dv : cfg.dk, hc = kv ? cfg.hidden_v() : cfg.hidden_k();
      const std::string sfx = kv ? "_v" : "_k";
      ck.both("pe" + sfx, p.pe, {H, l, D}, "[Hkv, l, D]");
      if (cfg.compress == CompressKind::Linear) {
        ck.both("w" + sfx, p.w, {H, D, l * D}, "[Hkv, D, l*D]");
        ck.both("b" + sfx, p.b, {H, D}, "[Hkv, D]");
      } else {
        ck.both("w1" + sfx, p.w1, {H, hc, l * D}, "[Hkv, h_c, l*D]");
        ck.both("b1" + sfx, p.b1, {H, hc}, "[Hkv, h_c]");
        ck.both("w2" + sfx, p.w2, {H, D, hc}, "[Hkv, D, h_c]");
        ck.both("b2" + sfx, p.b2, {H, D}, "[Hkv, D]");
      }
    }
  }
  if (!in.cu_seqlens.empty()) {
    const auto& cu = in.cu_seqlens;
    if (cu.size() < 2 || cu.front() != 0 || cu.back() != N)
      throw InputError(cat(ck.name("cu_seqlens"), ": must start at 0 and end at N = ", N, " (", cu.size(),
                           " offsets, first ", cu.empty() ? -1 : cu.front(), ", last ", cu.empty() ? -1 : cu.back(),
                           ")"));
    for (size_t b = 1; b < cu.size(); ++b)
      if (cu[b] < cu[b - 1])
        throw InputError(cat(ck.name("cu_seqlens"), ": offsets must not decrease (", cu[b - 1], " then ", cu[b],
                             " at index ", b, ")"));
  }
}

template <class S>
Tensor<S> compute_gates(const Config& cfg, const Inputs<S>& in) {
  const int64_t N = in.N();
  if (!in.gates.empty()) return in.gates;
  if (!in.gate_mlp.given()) return Tensor<S>({N, cfg.Hq, 3}, S(1));
  const auto& m = in.gate_mlp;
  Eigen::Map<const Mat<S>> X(m.x.data(), N, m.x.dim(1));
  Mat<S> Hd;
  if (!m.w0.empty()) {
    Eigen::Map<const Mat<S>> W0(m.w0.data(), m.w0.dim(0), m.w0.dim(1));
    Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> b0(m.b0.data(), m.b0.dim(0));
    Hd = X * W0;
    Hd.rowwise() += b0;
    Hd = Hd.unaryExpr([a = m.act](S z) { return activate(a, z); });
  } else {
    Hd = X;
  }
  Eigen::Map<const Mat<S>> W(m.w.data(), m.w.dim(0), m.w.dim(1));
  Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> b(m.b.data(), m.b.dim(0));
  Tensor<S> g({N, cfg.Hq, 3});
  Eigen::Map<Mat<S>> Z(g.data(), N, 3 * cfg.Hq);  // column h*3 + c is exactly g[t, h, c]
  Z.noalias() = Hd * W;
  Z.rowwise() += b;
  Z = Z.unaryExpr([](S z) { return sigmoid(z); });
  return g;
}

int set_threads(int n) {
  omp_set_num_threads(n > 0 ? n : omp_get_num_procs());
  return omp_get_max_threads();
}

template void check_inputs<double>(const Config&, const Inputs<double>&, bool, const RoleNamer&);
template void check_inputs<float>(const Config&, const Inputs<float>&, bool, const RoleNamer&);
template Tensor<double> compute_gates<double>(const Config&, const Inputs<double>&);
template Tensor<float> compute_gates<float>(const Config&, const Inputs<float>&);

}  // namespace nsa::ref
