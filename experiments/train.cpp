#include "train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "recall.hpp"
#include "rng.hpp"

namespace nsa::cli {

namespace {

// Adam over a list of parameter tensors, each with its gradient at the same index.
class Adam {
 public:
  explicit Adam(double lr) : lr_(lr) {}
  void step(const std::vector<Tensor<double>*>& params, const std::vector<const Tensor<double>*>& grads) {
    if (m_.empty())
      for (auto* p : params) m_.emplace_back(p->shape()), v_.emplace_back(p->shape());
    ++t_;
    const double c1 = 1 - std::pow(kBeta1, double(t_)), c2 = 1 - std::pow(kBeta2, double(t_));
    for (size_t i = 0; i < params.size(); ++i) {
      double* p = params[i]->data();
      const double* g = grads[i]->data();
      double *m = m_[i].data(), *v = v_[i].data();
      for (int64_t e = 0; e < params[i]->numel(); ++e) {
        m[e] = kBeta1 * m[e] + (1 - kBeta1) * g[e];
        v[e] = kBeta2 * v[e] + (1 - kBeta2) * g[e] * g[e];
        p[e] -= lr_ * (m[e] / c1) / (std::sqrt(v[e] / c2) + kEps);
      }
    }
  }

 private:
  static constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8;
  double lr_;
  int64_t t_ = 0;
  std::vector<Tensor<double>> m_, v_;
};

// The learned tensors of phi (the configured kind's), in a fixed order.
template <class P>
std::vector<decltype(&std::declval<P&>().k.pe)> phi_tensors(P& phi, CompressKind kind) {
  std::vector<decltype(&std::declval<P&>().k.pe)> out;
  for (auto* p : {&phi.k, &phi.v}) {
    if (kind == CompressKind::Linear)
      out.insert(out.end(), {&p->pe, &p->w, &p->b});
    else if (kind == CompressKind::Mlp)
      out.insert(out.end(), {&p->pe, &p->w1, &p->b1, &p->w2, &p->b2});
  }
  return out;
}

// One step's data: `batch` needle sequences packed as [B*T, H, D] with cu_seqlens.
struct Batch {
  ref::Inputs<double> in;
  Tensor<double> answer;  // [B, Hkv, dv]
  NeedleLayout layout;
};

Batch draw_batch(const TrainSpec& s, int64_t step) {
  GenSpec g = s.data;
  g.workload = "needle";
  g.Hq = s.cfg.Hq, g.Hkv = s.cfg.Hkv, g.dk = s.cfg.dk, g.dv = s.cfg.dv;
  g.B = 0;
  // The data stream: one generator per step, independent of phi's initial draw (seed, seed + 1).
  Rng rng(s.seed * 0x9E3779B97F4A7C15ull + 1000003ull * uint64_t(step + 1));
  g.depths.clear();
  for (int64_t b = 0; b < s.batch; ++b) g.depths.push_back(rng.uniform() * s.depth_max);
  g.seed = rng.next_u64();
  Generated w = generate(g);
  Batch out;
  const int64_t N = s.batch * g.T;
  auto packed = [&](const char* name) {
    const Tensor<double>& t = w.at(name);
    return t.reshaped({N, t.dim(-2), t.dim(-1)});
  };
  out.in.q = packed("q");
  out.in.k = packed("k");
  out.in.v = packed("v");
  if (s.batch > 1)
    for (int64_t b = 0; b <= s.batch; ++b) out.in.cu_seqlens.push_back(b * g.T);
  out.answer = w.at("needle_value").reshaped({s.batch, g.Hkv, g.dv});
  out.layout = needle_layout(g);
  return out;
}

}  // namespace

void validate(const TrainSpec& s) {
  s.cfg.validate();
  if (s.batch < 1) throw ConfigError(cat("batch = ", s.batch, " is invalid: expected >= 1"));
  if (s.steps < 1) throw ConfigError(cat("steps = ", s.steps, " is invalid: expected >= 1"));
  if (!(s.lr > 0) || !std::isfinite(s.lr)) throw ConfigError(cat("lr = ", s.lr, " is invalid: expected > 0"));
  if (!(s.depth_max >= 0 && s.depth_max <= 1))
    throw ConfigError(cat("depth_max = ", s.depth_max, " is invalid: expected a fraction in [0, 1]"));
  if (!s.learn_phi && !s.learn_gates) throw ConfigError("nothing to learn: both phi and the gates are frozen");
  GenSpec g = s.data;
  g.workload = "needle", g.B = 0, g.depths = {0};
  g.Hq = s.cfg.Hq, g.Hkv = s.cfg.Hkv, g.dk = s.cfg.dk, g.dv = s.cfg.dv;
  validate(g);
}

TrainResult train(const TrainSpec& s, const std::function<void(const StepLog&)>& on_step) {
  validate(s);
  const Config& c = s.cfg;
  const int64_t T = s.data.T, Q = s.data.questions, G = c.G();
  TrainResult res;
  res.phi = ref::random_compress_params<double>(c, s.seed);
  res.gate_w = Tensor<double>({1, 3 * c.Hq});
  res.gate_b = Tensor<double>({3 * c.Hq});
  Adam adam(s.lr);
  analysis::RecallOptions ropt;
  ropt.selectors = {analysis::Selector::Nsa};
  for (int64_t step = 0; step < s.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    Batch b = draw_batch(s, step);
    ref::Inputs<double>& in = b.in;
    const int64_t N = in.N();
    in.phi = res.phi;
    in.gate_mlp.x = Tensor<double>({N, 1}, 1.0);
    in.gate_mlp.w = res.gate_w;
    in.gate_mlp.b = res.gate_b;
    ref::check_inputs(c, in);
    const auto fwd = ref::forward(c, in);

    // The loss and dL/do at the question rows; every other row has no target.
    StepLog log;
    log.step = step;
    Tensor<double> dO({N, c.Hq, c.dv});
    const double count = double(s.batch * Q * c.Hq * c.dv);
    std::vector<int64_t> rows;  // packed question rows
    for (int64_t sq = 0; sq < s.batch; ++sq)
      for (int64_t t = b.layout.first_question; t < T; ++t) {
        const int64_t r = sq * T + t;
        rows.push_back(r);
        for (int64_t h = 0; h < c.Hq; ++h) {
          const double* w = b.answer.row(sq, h / G);
          for (int64_t e = 0; e < c.dv; ++e) {
            const double diff = fwd.o(r, h, e) - w[e];
            log.loss += diff * diff / count;
            dO(r, h, e) = 2 * diff / count;
          }
          for (int ch = 0; ch < kBranches; ++ch) log.gate[ch] += fwd.gates(r, h, ch);
        }
      }
    for (double& g : log.gate) g /= double(rows.size() * size_t(c.Hq));

    // needle_found: every needle token in a block the question's group selected.
    int64_t found = 0;
    for (int64_t sq = 0; sq < s.batch; ++sq)
      for (int64_t t = b.layout.first_question; t < T; ++t)
        for (int64_t g = 0; g < c.Hkv; ++g)
          found += needle_found(fwd.block_idx.row(sq * T + t, g), c.slc_count, b.layout.start[size_t(sq)],
                                b.layout.len, c.slc_len);
    log.needle_found = double(found) / double(rows.size() * size_t(c.Hkv));

    // The selection's recall and mass against the oracle, at the question rows with more than n
    // valid blocks (as the sweep averages them; NaN when there are none).
    const auto rec = analysis::recall(c, in, fwd, ropt);
    const auto& map = rec.map(analysis::Selector::Nsa);
    int64_t pairs = 0;
    for (int64_t r : rows)
      if (!rec.trivial[r])
        for (int64_t g = 0; g < c.Hkv; ++g, ++pairs) {
          log.recall += map.recall(r, g);
          log.mass += map.mass(r, g);
        }
    log.recall = pairs ? log.recall / double(pairs) : std::nan("");
    log.mass = pairs ? log.mass / double(pairs) : std::nan("");

    // Gradients (the selection's indices held fixed, docs/spec.md 7) and the update.
    const auto grad = ref::backward(c, in, fwd, dO);
    std::vector<Tensor<double>*> params;
    std::vector<const Tensor<double>*> grads;
    if (s.learn_phi) {
      auto p = phi_tensors(res.phi, c.compress);
      auto d = phi_tensors(grad.dphi, c.compress);
      params.insert(params.end(), p.begin(), p.end());
      grads.insert(grads.end(), d.begin(), d.end());
    }
    if (s.learn_gates) {
      params.insert(params.end(), {&res.gate_w, &res.gate_b});
      grads.insert(grads.end(), {&grad.dgate_mlp.w, &grad.dgate_mlp.b});
    }
    double n2 = 0;
    for (const auto* g : grads)
      for (double x : g->vec()) n2 += x * x;
    log.grad_norm = std::sqrt(n2);
    adam.step(params, grads);
    log.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    res.log.push_back(log);
    if (on_step) on_step(log);
  }
  return res;
}

}  // namespace nsa::cli
