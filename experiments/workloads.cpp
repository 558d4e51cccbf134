#include "workloads.hpp"

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

void validate(const GenSpec& s) {
  if (s.T < 1) throw ConfigError(cat("T = ", s.T, " is invalid: expected >= 1"));
  if (s.B < 0) throw ConfigError(cat("B = ", s.B, " is invalid: expected >= 0 (0: one unbatched sequence)"));
  for (auto [name, v] : {std::pair{"Hq", s.Hq}, {"Hkv", s.Hkv}, {"dk", s.dk}, {"dv", s.dv}})
    if (v < 1) throw ConfigError(cat(name, " = ", v, " is invalid: expected >= 1"));
  if (s.Hq % s.Hkv) throw ConfigError(cat("Hq = ", s.Hq, " is invalid: expected a multiple of Hkv = ", s.Hkv));
  if (s.gates != "none" && s.gates != "random")
    throw ConfigError(cat("gates = '", s.gates, "' is not one of: none, random"));
  if (s.workload != "random") throw ConfigError(cat("workload = '", s.workload, "' is not one of: random"));
}

std::vector<std::pair<std::string, Tensor<double>>> generate(const GenSpec& s) {
  validate(s);
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
  return out;
}

}  // namespace nsa::cli
