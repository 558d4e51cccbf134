#include "workloads.hpp"

#include <cmath>

#include "config.hpp"
#include "errors.hpp"
#include "rng.hpp"

namespace nsa::cli {

namespace {
Shape token_shape(const GenSpec& s, int64_t H, int64_t D) {
  return s.B > 0 ? Shape{s.B, s.T, H, D} : Shape{s.T, H, D};
}
Tensor<double> normal(Shape shape, Rng& rng) {
  Tensor<double> t(std::move(shape));
  for (auto& v : t.vec()) v = rng.normal();
  return t;
}
}  // namespace

std::vector<std::pair<std::string, Tensor<double>>> generate(const GenSpec& s) {
  if (s.T < 1) throw ConfigError(cat("T = ", s.T, " is invalid: expected >= 1"));
  if (s.B < 0) throw ConfigError(cat("B = ", s.B, " is invalid: expected >= 0 (0: one unbatched sequence)"));
  for (auto [name, v] : {std::pair{"Hq", s.Hq}, {"Hkv", s.Hkv}, {"dk", s.dk}, {"dv", s.dv}})
    if (v < 1) throw ConfigError(cat(name, " = ", v, " is invalid: expected >= 1"));
  if (s.Hq % s.Hkv) throw ConfigError(cat("Hq = ", s.Hq, " is invalid: expected a multiple of Hkv = ", s.Hkv));
  if (s.gates != "none" && s.gates != "random" && s.gates != "mlp" && s.gates != "linear")
    throw ConfigError(cat("gates = '", s.gates, "' is not one of: none, random, mlp, linear"));
  if (s.workload != "random") throw ConfigError(cat("workload = '", s.workload, "' is not one of: random"));
  Rng rng(s.seed);
  std::vector<std::pair<std::string, Tensor<double>>> out;
  out.emplace_back("q", normal(token_shape(s, s.Hq, s.dk), rng));
  out.emplace_back("k", normal(token_shape(s, s.Hkv, s.dk), rng));
  out.emplace_back("v", normal(token_shape(s, s.Hkv, s.dv), rng));
  if (s.separate_kv)
    for (const char* b : {"cmp", "slc", "win"}) {
      out.emplace_back(cat("k_", b), normal(token_shape(s, s.Hkv, s.dk), rng));
      out.emplace_back(cat("v_", b), normal(token_shape(s, s.Hkv, s.dv), rng));
    }
  if (s.gates == "random") {
    Tensor<double> g(token_shape(s, s.Hq, 3));
    for (auto& v : g.vec()) v = rng.uniform();
    out.emplace_back("gates", std::move(g));
  }
  if (s.gates == "mlp" || s.gates == "linear") {
    const int64_t dm = 16, dh = s.gates == "mlp" ? 8 : dm;
    auto scaled = [&](Shape shape, double sd) {
      Tensor<double> t = normal(std::move(shape), rng);
      for (auto& v : t.vec()) v *= sd;
      return t;
    };
    out.emplace_back("gate_x", normal(s.B > 0 ? Shape{s.B, s.T, dm} : Shape{s.T, dm}, rng));
    if (s.gates == "mlp") {
      out.emplace_back("gate_w0", scaled({dm, dh}, 1 / std::sqrt(double(dm))));
      out.emplace_back("gate_b0", scaled({dh}, 0.1));
    }
    out.emplace_back("gate_w", scaled({dh, 3 * s.Hq}, 1 / std::sqrt(double(dh))));
    out.emplace_back("gate_b", scaled({3 * s.Hq}, 0.1));
  }
  if (s.grad) out.emplace_back("do", normal(token_shape(s, s.Hq, s.dv), rng));
  return out;
}

}  // namespace nsa::cli
