#include "config.hpp"

namespace nsa {

const char* to_string(CompressKind k) {
  switch (k) {
    case CompressKind::Mean: return "mean";
    case CompressKind::Linear: return "linear";
    case CompressKind::Mlp: return "mlp";
  }
  return "?";
}

const char* to_string(Activation a) {
  switch (a) {
    case Activation::Gelu: return "gelu";
    case Activation::GeluTanh: return "gelu_tanh";
    case Activation::Relu: return "relu";
    case Activation::Silu: return "silu";
  }
  return "?";
}

CompressKind parse_compress_kind(const std::string& s) {
  if (s == "mean") return CompressKind::Mean;
  if (s == "linear") return CompressKind::Linear;
  if (s == "mlp") return CompressKind::Mlp;
  throw ConfigError(cat("compress = '", s, "' is not one of: mean, linear, mlp"));
}

Activation parse_activation(const std::string& s) {
  if (s == "gelu") return Activation::Gelu;
  if (s == "gelu_tanh") return Activation::GeluTanh;
  if (s == "relu") return Activation::Relu;
  if (s == "silu") return Activation::Silu;
  throw ConfigError(cat("activation = '", s, "' is not one of: gelu, gelu_tanh, relu, silu"));
}

namespace {
void require(bool ok, const char* field, int64_t value, const std::string& expected) {
  if (!ok) throw ConfigError(cat(field, " = ", value, " is invalid: expected ", expected));
}
}  // namespace

void Config::validate() const {
  require(Hq >= 1, "Hq (query heads)", Hq, ">= 1");
  require(Hkv >= 1, "Hkv (key/value heads)", Hkv, ">= 1");
  require(Hq % Hkv == 0, "Hq (query heads)", Hq, cat("a multiple of Hkv = ", Hkv, " (GQA groups)"));
  require(dk >= 1, "dk (query/key head dim)", dk, ">= 1");
  require(dv >= 1, "dv (value head dim)", dv, ">= 1");
  require(cmp_len >= 1, "cmp_len (l)", cmp_len, ">= 1");
  require(cmp_stride >= 1 && cmp_stride <= cmp_len, "cmp_stride (d)", cmp_stride,
          cat("1 <= d <= cmp_len (l) = ", cmp_len));
  require(cmp_hidden >= 0, "cmp_hidden (h_c)", cmp_hidden, ">= 1 (or 0 for the head dim)");
  require(slc_len >= 1, "slc_len (l')", slc_len, ">= 1");
  require(slc_count >= 1, "slc_count (n)", slc_count, ">= 1");
  require(init_blocks >= 0, "init_blocks", init_blocks, ">= 0");
  require(local_blocks >= 0, "local_blocks", local_blocks, ">= 0");
  require(init_blocks + local_blocks <= slc_count, "slc_count (n)", slc_count,
          cat(">= init_blocks + local_blocks = ", init_blocks + local_blocks,
              " (forced blocks are counted within n)"));
  require(window >= 1, "window (w)", window, ">= 1");
  if (!(scale >= 0) || !std::isfinite(scale))
    throw ConfigError(cat("scale = ", scale, " is invalid: expected a finite value > 0 (or 0 for 1/sqrt(dk))"));
}

}  // namespace nsa
