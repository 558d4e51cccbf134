// Config: the one description of an NSA layer, shared by the reference, the CUDA path and every
// tool (STYLE 2). Field names follow docs/spec.md; `validate()` is the only place that
// checks them, and its messages name the field, its value and the allowed range.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "errors.hpp"

namespace nsa {

// The three branches, in the order of the gate tensor's last axis (docs/interface.md).
enum class Branch : int { Cmp = 0, Slc = 1, Win = 2 };
constexpr int kBranches = 3;
inline const char* branch_name(Branch b) {
  return b == Branch::Cmp ? "cmp" : b == Branch::Slc ? "slc" : "win";
}

// phi, the map from a block of l keys (values) to one compressed key (value). docs/spec.md 3.
enum class CompressKind { Mean, Linear, Mlp };
// Hidden-layer activations of the compression MLP and the gate MLP.
enum class Activation { Gelu, GeluTanh, Relu, Silu };

const char* to_string(CompressKind k);
const char* to_string(Activation a);
CompressKind parse_compress_kind(const std::string& s);  // throws ConfigError naming the choices
Activation parse_activation(const std::string& s);

struct Config {
  // Heads and head dimensions.
  int64_t Hq = 0;   // query heads
  int64_t Hkv = 0;  // key/value heads; Hq % Hkv == 0, G = Hq / Hkv query heads share one
  int64_t dk = 0;   // query/key head dim
  int64_t dv = 0;   // value head dim (may differ from dk)

  // Compression branch (Eq. 7): block i covers tokens [i*d, i*d + l).
  int64_t cmp_len = 32;     // l
  int64_t cmp_stride = 16;  // d, 1 <= d <= l
  CompressKind compress = CompressKind::Mlp;
  int64_t cmp_hidden = 0;   // h_c of the mlp phi; 0 means dk (keys) and dv (values)
  Activation cmp_act = Activation::Gelu;

  // Selection branch (Eq. 8-12): block j covers tokens [j*l', (j+1)*l').
  int64_t slc_len = 64;      // l'
  int64_t slc_count = 16;    // n, selected blocks per query and group, forced ones included
  int64_t init_blocks = 1;   // always-selected leading blocks
  int64_t local_blocks = 2;  // always-selected blocks ending at the query's own block

  // Sliding-window branch: keys [max(0, t-w+1), t].
  int64_t window = 512;  // w

  double scale = 0;  // softmax scale; 0 means 1/sqrt(dk)

  int64_t G() const { return Hq / Hkv; }
  double softmax_scale() const { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(dk)); }
  int64_t hidden_k() const { return cmp_hidden > 0 ? cmp_hidden : dk; }  // h_c for keys
  int64_t hidden_v() const { return cmp_hidden > 0 ? cmp_hidden : dv; }  // h_c for values

  // Compressed blocks of a sequence of T tokens: Nc = T >= l ? (T - l)/d + 1 : 0.
  int64_t num_cmp_blocks(int64_t T) const { return T >= cmp_len ? (T - cmp_len) / cmp_stride + 1 : 0; }
  // Compressed blocks query t sees (i*d + l - 1 <= t): exactly the blocks of the prefix [0, t].
  int64_t cmp_visible(int64_t t) const { return num_cmp_blocks(t + 1); }
  // Selection blocks of a sequence: ceil(T / l').
  int64_t num_slc_blocks(int64_t T) const { return (T + slc_len - 1) / slc_len; }
  // Selection blocks valid for query t (j*l' <= t).
  int64_t slc_valid(int64_t t) const { return t / slc_len + 1; }
  // First key of query t's window.
  int64_t win_start(int64_t t) const { return t - window + 1 > 0 ? t - window + 1 : 0; }

  // Throws ConfigError naming the first bad field, its value and the allowed range.
  void validate() const;
};

}  // namespace nsa
