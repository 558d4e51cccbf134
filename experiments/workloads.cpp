#include "workloads.hpp"

#include <algorithm>
#include <cmath>

#include "config.hpp"
#include "errors.hpp"
#include "rng.hpp"

namespace nsa::cli {

namespace {

Shape token_shape(const GenSpec& s, int64_t H, int64_t D) {
  const bool batch = s.workload == "needle" ? s.depths.size() > 1 : s.B > 0;
  return batch ? Shape{s.sequences(), s.T, H, D} : Shape{s.T, H, D};
}

Tensor<double> normal(Shape shape, Rng& rng) {
  Tensor<double> t(std::move(shape));
  for (auto& v : t.vec()) v = rng.normal();
  return t;
}

// A random vector of exactly norm sqrt(D): entries of the size of N(0, 1) ones, and
// |u|^2 / D = 1 so that the planted logit margin is exactly the strength asked for.
std::vector<double> direction(int64_t D, Rng& rng) {
  std::vector<double> u(static_cast<size_t>(D));
  double n2 = 0;
  for (auto& x : u) {
    x = rng.normal();
    n2 += x * x;
  }
  const double f = std::sqrt(double(D) / n2);
  for (auto& x : u) x *= f;
  return u;
}

// Row (sequence b, token t, head h) of a [T, H, D] or [S, T, H, D] tensor.
double* row(Tensor<double>& x, int64_t T, int64_t b, int64_t t, int64_t h) {
  const int64_t H = x.dim(-2), D = x.dim(-1);
  return x.data() + ((b * T + t) * H + h) * D;
}

// needle: plants one needle per sequence into every key/value tensor and the questions into q.
void plant_needles(const GenSpec& s, Generated& g, Rng& rng) {
  const NeedleLayout lay = needle_layout(s);
  const int64_t S = s.sequences(), G = s.Hq / s.Hkv;
  const double margin = s.needle_strength / std::sqrt(double(s.dk));
  Tensor<double> answer({S, s.Hkv, s.dv});
  Tensor<double>& q = g.tensors[0].second;
  for (int64_t b = 0; b < S; ++b)
    for (int64_t h = 0; h < s.Hkv; ++h) {
      const auto u = direction(s.dk, rng), w = direction(s.dv, rng);
      std::copy(w.begin(), w.end(), answer.row(b, h));
      for (auto& [name, x] : g.tensors) {
        const bool key = name[0] == 'k', value = name[0] == 'v';
        if (!key && !value) continue;
        for (int64_t i = 0; i < lay.len; ++i) {
          double* r = row(x, s.T, b, lay.start[size_t(b)] + i, h);
          if (key)
            for (int64_t e = 0; e < s.dk; ++e) r[e] += margin * u[size_t(e)];
          else
            std::copy(w.begin(), w.end(), r);
        }
      }
      for (int64_t t = lay.first_question; t < s.T; ++t)
        for (int64_t j = 0; j < G; ++j) std::copy(u.begin(), u.end(), row(q, s.T, b, t, h * G + j));
    }
  g.tensors.emplace_back("needle_value", std::move(answer));
}

// clustered: k = a z + e along each sequence, z the AR(1) latent of the header.
Tensor<double> clustered_keys(const GenSpec& s, Rng& rng) {
  Tensor<double> k(token_shape(s, s.Hkv, s.dk));
  const double rho = s.corr_len > 0 ? std::exp(-1.0 / s.corr_len) : 0.0, innov = std::sqrt(1 - rho * rho);
  std::vector<double> z(static_cast<size_t>(s.dk));
  for (int64_t b = 0; b < s.sequences(); ++b)
    for (int64_t h = 0; h < s.Hkv; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        double* r = row(k, s.T, b, t, h);
        for (int64_t e = 0; e < s.dk; ++e) {
          double& ze = z[size_t(e)];
          ze = t == 0 ? rng.normal() : rho * ze + innov * rng.normal();  // stationary: z[0] ~ N(0, 1)
          r[e] = s.cluster_strength * ze + rng.normal();
        }
      }
  return k;
}

}  // namespace

int64_t GenSpec::sequences() const {
  return workload == "needle" ? static_cast<int64_t>(depths.size()) : std::max<int64_t>(B, 1);
}

void validate(const GenSpec& s) {
  if (s.T < 1) throw ConfigError(cat("T = ", s.T, " is invalid: expected >= 1"));
  if (s.B < 0) throw ConfigError(cat("B = ", s.B, " is invalid: expected >= 0 (0: one unbatched sequence)"));
  for (auto [name, v] : {std::pair{"Hq", s.Hq}, {"Hkv", s.Hkv}, {"dk", s.dk}, {"dv", s.dv}})
    if (v < 1) throw ConfigError(cat(name, " = ", v, " is invalid: expected >= 1"));
  if (s.Hq % s.Hkv) throw ConfigError(cat("Hq = ", s.Hq, " is invalid: expected a multiple of Hkv = ", s.Hkv));
  if (s.gates != "none" && s.gates != "random" && s.gates != "mlp" && s.gates != "linear")
    throw ConfigError(cat("gates = '", s.gates, "' is not one of: none, random, mlp, linear"));
  if (s.workload == "needle") {
    if (s.B != 0)
      throw ConfigError(cat("B = ", s.B, " with workload = needle: the needle workload writes one sequence per depth; "
                            "give several depths for a batch"));
    if (s.depths.empty()) throw ConfigError("depth: the needle workload needs at least one depth");
    for (double d : s.depths)
      if (!(d >= 0 && d <= 1)) throw ConfigError(cat("depth = ", d, " is invalid: expected a fraction in [0, 1]"));
    if (s.needle_len < 1) throw ConfigError(cat("needle_len = ", s.needle_len, " is invalid: expected >= 1"));
    if (s.questions < 1) throw ConfigError(cat("questions = ", s.questions, " is invalid: expected >= 1"));
    if (s.T < s.needle_len + s.questions)
      throw ConfigError(cat("T = ", s.T, " is too short for the needle workload: expected >= needle_len + questions = ",
                            s.needle_len + s.questions));
    if (!std::isfinite(s.needle_strength))
      throw ConfigError(cat("needle_strength = ", s.needle_strength, " is invalid: expected a finite number"));
  } else if (s.workload == "clustered") {
    if (!(s.corr_len >= 0) || !std::isfinite(s.corr_len))
      throw ConfigError(cat("corr_len = ", s.corr_len, " is invalid: expected a finite number of tokens >= 0"));
    if (!(s.cluster_strength >= 0) || !std::isfinite(s.cluster_strength))
      throw ConfigError(cat("cluster_strength = ", s.cluster_strength, " is invalid: expected a finite number >= 0"));
  } else if (s.workload != "random") {
    throw ConfigError(cat("workload = '", s.workload, "' is not one of: random, needle, clustered"));
  }
}

NeedleLayout needle_layout(const GenSpec& s) {
  validate(s);
  if (s.workload != "needle") throw ConfigError(cat("workload = '", s.workload, "' plants no needle"));
  NeedleLayout lay;
  lay.len = s.needle_len;
  lay.first_question = s.T - s.questions;
  const int64_t span = s.T - s.questions - s.needle_len;  // last possible start
  for (double d : s.depths) lay.start.push_back(std::llround(d * double(span)));
  return lay;
}

bool needle_found(const int32_t* idx, int64_t n, int64_t start, int64_t len, int64_t slc_len) {
  for (int64_t j = start / slc_len; j <= (start + len - 1) / slc_len; ++j)
    if (std::find(idx, idx + n, int32_t(j)) == idx + n) return false;
  return true;
}

const Tensor<double>& Generated::at(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  throw Error(cat("the workload has no tensor '", name, "'"));
}

bool Generated::has(const std::string& name) const {
  for (const auto& nt : tensors)
    if (nt.first == name) return true;
  return false;
}

Generated generate(const GenSpec& s) {
  validate(s);
  // One seeded stream, drawn in a fixed order: q, k, v, per-branch k/v, gates, then what the
  // workload plants. Keys of the clustered workload replace the N(0, 1) draw of k in place.
  Rng rng(s.seed);
  Generated g;
  g.tensors.emplace_back("q", normal(token_shape(s, s.Hq, s.dk), rng));
  g.tensors.emplace_back("k", s.workload == "clustered" ? clustered_keys(s, rng) : normal(token_shape(s, s.Hkv, s.dk), rng));
  g.tensors.emplace_back("v", normal(token_shape(s, s.Hkv, s.dv), rng));
  if (s.separate_kv)
    for (const char* b : {"cmp", "slc", "win"}) {
      g.tensors.emplace_back(cat("k_", b), s.workload == "clustered" ? clustered_keys(s, rng)
                                                                    : normal(token_shape(s, s.Hkv, s.dk), rng));
      g.tensors.emplace_back(cat("v_", b), normal(token_shape(s, s.Hkv, s.dv), rng));
    }
  if (s.gates == "random") {
    Tensor<double> gt(token_shape(s, s.Hq, 3));
    for (auto& v : gt.vec()) v = rng.uniform();
    g.tensors.emplace_back("gates", std::move(gt));
  }
  if (s.gates == "mlp" || s.gates == "linear") {
    const int64_t dm = 16, dh = s.gates == "mlp" ? 8 : dm;
    auto scaled = [&](Shape shape, double sd) {
      Tensor<double> t = normal(std::move(shape), rng);
      for (auto& v : t.vec()) v *= sd;
      return t;
    };
    const Shape x = token_shape(s, 1, dm);  // [T, 1, dm] or [S, T, 1, dm] -> drop the head axis
    g.tensors.emplace_back("gate_x", normal(x.size() == 4 ? Shape{x[0], x[1], dm} : Shape{x[0], dm}, rng));
    if (s.gates == "mlp") {
      g.tensors.emplace_back("gate_w0", scaled({dm, dh}, 1 / std::sqrt(double(dm))));
      g.tensors.emplace_back("gate_b0", scaled({dh}, 0.1));
    }
    g.tensors.emplace_back("gate_w", scaled({dh, 3 * s.Hq}, 1 / std::sqrt(double(dh))));
    g.tensors.emplace_back("gate_b", scaled({3 * s.Hq}, 0.1));
  }
  if (s.grad) g.tensors.emplace_back("do", normal(token_shape(s, s.Hq, s.dv), rng));
  if (s.workload == "needle") plant_needles(s, g, rng);
  return g;
}

}  // namespace nsa::cli
