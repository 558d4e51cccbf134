// The memory traffic and roofline model (traffic.hpp).
#include "traffic.hpp"

#include <algorithm>
#include <utility>

#include "cost.hpp"
#include "decode.hpp"

namespace nsa::analysis {

const char* to_string(Convention c) { return c == Convention::Paper ? "paper" : "exact"; }
const char* to_string(Loading l) { return l == Loading::GroupCentric ? "group" : "head"; }

Convention parse_convention(const std::string& s) {
  if (s == "paper") return Convention::Paper;
  if (s == "exact") return Convention::Exact;
  throw ConfigError(cat("convention = '", s, "' is not one of: paper, exact"));
}

Loading parse_loading(const std::string& s) {
  if (s == "group") return Loading::GroupCentric;
  if (s == "head") return Loading::PerHead;
  throw ConfigError(cat("loading = '", s, "' is not one of: group, head"));
}

std::vector<std::string> device_presets() { return {"h100", "a100", "h100-measured"}; }

Device device_preset(const std::string& name) {
  if (name == "h100") return {"h100", 989.4e12, 3.35e12};
  if (name == "a100") return {"a100", 312e12, 2.039e12};
  if (name == "h100-measured") return {"h100-measured", 800e12, 3.0e12};
  throw ConfigError(cat("device '", name, "' is not one of: h100, a100, h100-measured (or give --peak-tflops and --bandwidth-tbs)"));
}

double roofline_ms(double flops, double bytes, const Device& dev) {
  if (!(dev.flops_per_s > 0) || !(dev.bytes_per_s > 0))
    throw ConfigError(cat("device '", dev.name, "': peak FLOP/s = ", dev.flops_per_s, " and bandwidth = ",
                          dev.bytes_per_s, " B/s must both be > 0"));
  return 1e3 * std::max(flops / dev.flops_per_s, bytes / dev.bytes_per_s);
}

BranchTraffic& BranchTraffic::operator+=(const BranchTraffic& o) {
  tokens += o.tokens;
  bytes += o.bytes;
  flops += o.flops;
  return *this;
}

BranchTraffic Traffic::nsa() const {
  BranchTraffic s = phi;
  s += cmp;
  s += slc;
  s += win;
  return s;
}

double Traffic::expected_speedup() const { return full.tokens / nsa().tokens; }

double Traffic::nsa_ms(const Device& dev) const {
  double ms = 0;
  for (const BranchTraffic* b : {&phi, &cmp, &slc, &win})
    if (b->flops > 0 || b->bytes > 0) ms += roofline_ms(b->flops, b->bytes, dev);
  return ms;
}

double Traffic::full_ms(const Device& dev) const { return roofline_ms(full.flops, full.bytes, dev); }

namespace {

void check_args(const Config& cfg, int64_t len, int64_t batch, int dtype_bytes, const TrafficOptions& opt,
                const char* len_name) {
  cfg.validate();
  if (len < 1) throw ConfigError(cat(len_name, " = ", len, " is invalid: expected >= 1"));
  if (batch < 1) throw ConfigError(cat("batch = ", batch, " is invalid: expected >= 1"));
  if (dtype_bytes < 1) throw ConfigError(cat("dtype bytes = ", dtype_bytes, " is invalid: expected >= 1"));
  if (opt.q_tile < 1) throw ConfigError(cat("q_tile = ", opt.q_tile, " is invalid: expected >= 1"));
}

// A branch that reads `tokens` K/V rows per KV head and sequence and visits `keys` keys per
// query head (FLOPs), with `io` further bytes (q, o, parameters).
BranchTraffic attention_branch(const Config& c, double tokens, double keys, int64_t batch, int dtype_bytes,
                               Loading loading, double io) {
  const double G = loading == Loading::PerHead ? double(c.G()) : 1.0;
  BranchTraffic b;
  b.tokens = tokens * G;
  b.bytes = b.tokens * double(c.Hkv) * double(batch) * double(c.dk + c.dv) * dtype_bytes + io;
  b.flops = keys * 2.0 * double(c.dk + c.dv) * double(c.Hq) * double(batch);
  return b;
}

}  // namespace

Traffic decode_traffic(const Config& c, int64_t s, int64_t batch, int dtype_bytes, Convention conv,
                       const TrafficOptions& opt) {
  check_args(c, s, batch, dtype_bytes, opt, "context");
  Traffic tr;
  const Loading ld = opt.loading;
  if (conv == Convention::Paper) {
    const double cmp = double(s / c.cmp_stride), slc = double(c.slc_count * c.slc_len), win = double(c.window);
    tr.cmp = attention_branch(c, cmp, cmp, batch, dtype_bytes, ld, 0);
    tr.slc = attention_branch(c, slc, slc, batch, dtype_bytes, ld, 0);
    tr.win = attention_branch(c, win, win, batch, dtype_bytes, ld, 0);
    tr.full = attention_branch(c, double(s), double(s), batch, dtype_bytes, ld, 0);
    return tr;
  }
  // The decode path's own count (reference/decode.hpp): cmp, slc and win rows of this step.
  const ref::StepTokens st = ref::step_tokens(c, s);
  // Each attention kernel reads the step's queries and writes its output.
  const double qo = double(batch) * double(c.Hq) * double(c.dk + c.dv) * dtype_bytes;
  tr.cmp = attention_branch(c, st.cmp, st.cmp, batch, dtype_bytes, ld, qo);
  tr.slc = attention_branch(c, st.slc, st.slc, batch, dtype_bytes, ld, qo);
  tr.win = attention_branch(c, st.win, st.win, batch, dtype_bytes, ld, qo);
  tr.full = attention_branch(c, st.full, st.full, batch, dtype_bytes, ld, qo);
  // phi: every d-th step emits (l raw rows in, one compressed row out, the parameters read once
  // for the batch); amortised, 1/d of that per step. Its loading does not depend on the heads.
  const double per_step = 1.0 / double(c.cmp_stride);
  tr.phi.tokens = double(c.cmp_len) * per_step;
  tr.phi.bytes = (tr.phi.tokens + per_step) * double(batch) * double(c.Hkv) * double(c.dk + c.dv) * dtype_bytes +
                 ref::phi_param_bytes(c, dtype_bytes) * per_step;
  tr.phi.flops = phi_flops_per_block(c) * double(c.Hkv) * double(batch) * per_step;
  return tr;
}

Traffic prefill_traffic(const Config& c, int64_t T, int64_t batch, int dtype_bytes, const TrafficOptions& opt) {
  check_args(c, T, batch, dtype_bytes, opt, "T");
  Traffic tr;
  const Loading ld = opt.loading;
  double full_rows = 0, cmp_rows = 0, win_rows = 0;
  for (int64_t t0 = 0; t0 < T; t0 += opt.q_tile) {
    const int64_t t1 = std::min(T, t0 + opt.q_tile);
    full_rows += double(t1);
    cmp_rows += double(c.cmp_visible(t1 - 1));
    win_rows += double(t1 - c.win_start(t0));
  }
  double slc_rows = 0;
  for (int64_t t = 0; t < T; ++t) slc_rows += double(slc_tokens(c, t));
  const ForwardFlops f = nsa_forward_flops(c, T);
  const double key_flops = 2.0 * double(c.dk + c.dv) * double(c.Hq);  // per visited key, all heads
  const double qo = double(batch) * double(T) * double(c.Hq) * double(c.dk + c.dv) * dtype_bytes;
  tr.cmp = attention_branch(c, cmp_rows, f.cmp / key_flops, batch, dtype_bytes, ld, qo);
  tr.slc = attention_branch(c, slc_rows, f.slc / key_flops, batch, dtype_bytes, ld, qo);
  tr.win = attention_branch(c, win_rows, f.win / key_flops, batch, dtype_bytes, ld, qo);
  tr.full = attention_branch(c, full_rows, full_forward_flops(c, T) / key_flops, batch, dtype_bytes, ld, qo);
  const double Nc = double(c.num_cmp_blocks(T));
  tr.phi.tokens = Nc * double(c.cmp_len);
  tr.phi.bytes = (tr.phi.tokens + Nc) * double(batch) * double(c.Hkv) * double(c.dk + c.dv) * dtype_bytes +
                 ref::phi_param_bytes(c, dtype_bytes);
  tr.phi.flops = f.phi * double(batch);
  return tr;
}

}  // namespace nsa::analysis
