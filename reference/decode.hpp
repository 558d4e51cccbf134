// Decoding with a KV cache (docs/spec.md 8): a step appends one token to each of a batch of
// sequences and computes its output, which equals the prefill forward pass at that position
// (ref::forward on the whole sequence; tests/test_decode.cpp checks every output to 1e-12).
//
// Eigen-free, so CUDA host code can include it and mirror the layout.
//
// ---- Cache layout (DecodeCache) -----------------------------------------------------------------
// B sequences, each with room for `capacity` tokens; sequence b holds s_b = len[b] tokens. A row
// is the [Hkv, D] slice of one token, in the forward inputs' [T, Hkv, D] order, so a prompt is
// copied into the cache as it is and a kernel reads one head's row as D contiguous values.
//
//   compression  k_cmp  [B, Ncap, Hkv, dk]   compressed keys emitted so far: row i = phi(raw keys
//                v_cmp  [B, Ncap, Hkv, dv]   [i*d, i*d + l)); rows [0, Nc(s_b)) are filled,
//                                            Nc(s) = s >= l ? (s - l)/d + 1 : 0, Ncap = Nc(capacity)
//                k_tail [B, L, Hkv, dk]      ring of the last l raw keys of the branch: token u at
//                v_tail [B, L, Hkv, dv]      slot u % l; L = min(l, capacity)
//   selection    k_slc  [B, capacity, Hkv, dk]   the full raw history: token u at row u
//                v_slc  [B, capacity, Hkv, dv]
//   window       k_win  [B, W, Hkv, dk]      ring of the last w raw keys: token u at slot u % w;
//                v_win  [B, W, Hkv, dv]      W = min(w, capacity)
//
// Shared keys/values (KvSharing): where the compression (window) branch uses the same keys or
// values as the selection branch, its ring is not stored (an empty tensor) and it reads the
// selection history instead: with the common shared k, v the cache is the full raw history plus
// the compressed rows, and the window and the compression tail are views into the history.
//
// A compressed row is emitted when the length s reached by an append satisfies s >= l and
// (s - l) % d == 0: block i = (s - l)/d has just been completed; phi reads its l raw rows from the
// tail (they are the last l tokens). One step therefore emits at most one row; an append of many
// tokens emits all the blocks it completes at once.
//
// ---- Traffic per step (docs/spec.md 8, the paper's Section 5.2) ---------------------------------
// The step of the token at position t (cache length s = t + 1 after appending it) reads, per KV
// head: Nc(s) compressed rows, the tokens of the n selected blocks (u <= t: at most n*l'), and
// min(w, s) window rows; full attention reads s. A step that emits a compressed row also reads
// the l raw tail rows and phi's parameters. The paper writes floor((s - l)/d) for the compressed
// count; the exact count of rows a query at t sees is floor((s - l)/d) + 1 (Config::cmp_visible).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "nsa_ref.hpp"
#include "tensor.hpp"

namespace nsa::ref {

// Which raw keys/values the compression and window branches read from the selection history.
// True: the branch uses the same tensor as the selection branch, so the cache stores no ring
// for it. Keys and values are independent (a branch may have its own keys but shared values).
struct KvSharing {
  bool cmp_k = true, cmp_v = true;  // compression branch keys, values
  bool win_k = true, win_v = true;  // window branch keys, values
  bool operator==(const KvSharing& o) const {
    return cmp_k == o.cmp_k && cmp_v == o.cmp_v && win_k == o.win_k && win_v == o.win_v;
  }
  bool operator!=(const KvSharing& o) const { return !(*this == o); }
};

// The sharing of a workload: a branch shares with the selection branch when neither has a
// tensor of its own (Inputs::k_own / v_own empty for both).
template <class S>
KvSharing kv_sharing(const Inputs<S>& in);

template <class S>
struct DecodeCache {
  Config cfg;                  // the layer; the layout depends on l, d, w
  KvSharing share;
  int64_t capacity = 0;        // tokens per sequence the cache has room for
  std::vector<int64_t> len;    // [B] tokens held per sequence (s_b)

  Tensor<S> k_cmp;   // [B, Ncap, Hkv, dk]  compressed keys, Ncap = Nc(capacity)
  Tensor<S> v_cmp;   // [B, Ncap, Hkv, dv]
  Tensor<S> k_tail;  // [B, L, Hkv, dk]     ring, token u at slot u % l; empty when share.cmp_k
  Tensor<S> v_tail;  // [B, L, Hkv, dv]     empty when share.cmp_v
  Tensor<S> k_slc;   // [B, capacity, Hkv, dk]  full raw history
  Tensor<S> v_slc;   // [B, capacity, Hkv, dv]
  Tensor<S> k_win;   // [B, W, Hkv, dk]     ring, token u at slot u % w; empty when share.win_k
  Tensor<S> v_win;   // [B, W, Hkv, dv]     empty when share.win_v

  int64_t B() const { return static_cast<int64_t>(len.size()); }
  int64_t cmp_rows() const { return cfg.num_cmp_blocks(capacity); }              // Ncap
  int64_t tail_rows() const { return capacity < cfg.cmp_len ? capacity : cfg.cmp_len; }  // L
  int64_t win_rows() const { return capacity < cfg.window ? capacity : cfg.window; }    // W

  // The [Hkv, D] row of token u of sequence b as branch c sees it: the history, or the branch's
  // ring (valid for the last l, respectively w, tokens only).
  const S* key(Branch c, int64_t b, int64_t u) const { return raw(c, b, u, cfg.dk, k_slc, k_tail, k_win, false); }
  const S* value(Branch c, int64_t b, int64_t u) const { return raw(c, b, u, cfg.dv, v_slc, v_tail, v_win, true); }
  // The [Hkv, D] compressed row i of sequence b.
  const S* cmp_key(int64_t b, int64_t i) const { return k_cmp.data() + (b * cmp_rows() + i) * cfg.Hkv * cfg.dk; }
  const S* cmp_value(int64_t b, int64_t i) const { return v_cmp.data() + (b * cmp_rows() + i) * cfg.Hkv * cfg.dv; }

 private:
  const S* raw(Branch c, int64_t b, int64_t u, int64_t D, const Tensor<S>& hist, const Tensor<S>& tail,
               const Tensor<S>& win, bool values) const {
    const int64_t row = cfg.Hkv * D;
    if (c == Branch::Cmp && !(values ? share.cmp_v : share.cmp_k))
      return tail.data() + (b * tail_rows() + u % cfg.cmp_len) * row;
    if (c == Branch::Win && !(values ? share.win_v : share.win_k))
      return win.data() + (b * win_rows() + u % cfg.window) * row;
    return hist.data() + (b * capacity + u) * row;
  }
};

// An empty cache for B sequences of up to `capacity` tokens. cfg must be valid.
// append, prefill and decode_step refuse before changing anything: InputError for sequences out
// of range or addressed twice, inputs that do not match the addressed sequences or the cache's
// sharing; ResourceError for tokens beyond the capacity.
template <class S>
DecodeCache<S> make_cache(const Config& cfg, const KvSharing& share, int64_t B, int64_t capacity);

// Appends a prompt to each listed sequence (seqs[b] gets the rows of packed sequence b of `in`;
// empty seqs: all B, in order) and emits the compressed rows the new tokens complete, phi on
// the raw rows (from the tail for tokens already held, with in.phi). No outputs are computed.
// `in` must have passed check_inputs and share like the cache; sequences may already hold tokens.
template <class S>
void append(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs = {});

// The prefill of empty sequences: the forward pass on the prompts (its outputs are the result),
// and the cache filled from the prompts' rows and the forward pass's compressed rows, so phi
// runs once per block. Throws InputError if a listed sequence already holds tokens.
template <class S>
ForwardResult<S> prefill(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs = {},
                         Path path = Path::Fast);

// The keys/values one step reads, in tokens per KV head (docs/spec.md 8). The groups select
// different blocks, so a step's selection count is the mean over the Hkv groups (all equal when
// local_blocks >= 1); counts times Hkv * (dk + dv) * elem are then exactly the bytes read.
struct StepTokens {
  double cmp = 0;   // compressed rows visible to the new token: Nc(s)
  double slc = 0;   // raw tokens of the selected blocks, u <= t
  double win = 0;   // raw tokens of the window: min(w, s)
  double emit = 0;  // raw tail rows phi reads when this step emits a compressed row: l, else 0
  double full = 0;  // what full attention reads: s
  double attended() const { return cmp + slc + win; }  // the spec's count (docs/spec.md 8)
  double total() const { return attended() + emit; }
};

// The step's outputs, one row per stepped sequence, with every intermediate of ForwardResult.
template <class S>
struct StepResult {
  std::vector<int64_t> pos;                    // [Bs] position t of each row's token
  Tensor<S> o;                                 // [Bs, Hq, dv]  Eq. 5
  std::array<Tensor<S>, kBranches> o_branch;   // [Bs, Hq, dv]  O_cmp, O_slc, O_win
  std::array<Tensor<S>, kBranches> lse;        // [Bs, Hq]      -inf where a branch sees no key
  Tensor<S> gates;                             // [Bs, Hq, 3]
  Tensor<int32_t> block_idx;                   // [Bs, Hkv, n]  ascending, -1 padding
  Tensor<S> block_scores;                      // [Bs, Hkv, NBs] P of Eq. 10, 0 where invalid;
                                               //   NBs = max over the rows of ceil((t+1)/l')
  std::vector<StepTokens> tokens;              // [Bs] what each row's step read
};

// One decode step: row b of `in` (one token per stepped sequence, cu_seqlens empty) is appended
// to sequence seqs[b] (empty seqs: all B, in order) at position t = its length, a compressed row
// is emitted if the token completes a block, and the token's outputs are computed from the
// cache alone: the compressed rows it sees, its selected blocks of the history, its window.
// `in` must have passed check_inputs and share like the cache.
template <class S>
StepResult<S> decode_step(DecodeCache<S>& cache, const Inputs<S>& in, const std::vector<int64_t>& seqs = {});

// One sequence's decode step within a run, and what it read.
struct StepRecord {
  int64_t seq = 0;  // sequence b of the workload
  int64_t pos = 0;  // position t of the token (the cache held t tokens before the step)
  StepTokens tokens;
};

template <class S>
struct DecodeRun {
  ForwardResult<S> out;           // forward()'s layout for the whole workload
  std::vector<StepRecord> steps;  // every decode step of every sequence, in the order taken
  DecodeCache<S> cache;           // the cache at the end, every sequence complete
  double prefill_seconds = 0;     // wall time of the prefill (forward pass on the prompts)
  double step_seconds = 0;        // wall time of all decode steps
  int64_t step_calls = 0;         // decode_step calls (each steps every sequence with tokens left)
};

// A whole workload through the cache, as `nsa decode` runs it: sequence b (of the packed
// sequences of `in`) is prefilled with its first prefix[b] tokens (prefill(): the forward pass
// on the prompts), then decoded one token per step, all sequences that still have tokens
// stepping together as one batch. Positions < prefix[b] come from the prefill, the others from
// decode_step; k_cmp_compressed is the cache's compressed rows at the end. `in` must have
// passed check_inputs; prefix[b] <= T_b.
template <class S>
DecodeRun<S> decode_workload(const Config& cfg, const Inputs<S>& in, const std::vector<int64_t>& prefix,
                             Path path = Path::Fast);

// The rows of a whole workload gathered into the Inputs of a prefill or a step. The layer's
// parameters (phi, the gate MLP's weights) are copied once, at construction, not per step.
template <class S>
class RowGather {
 public:
  explicit RowGather(const Inputs<S>& all);
  // Rows `rows` of every per-token tensor (q, k, v, per-branch k/v, gates, gate_x), packed as
  // sequences with offsets cu (empty: no cu_seqlens, as a step wants). Valid until the next call.
  const Inputs<S>& take(const std::vector<int64_t>& rows, const std::vector<int64_t>& cu = {});

 private:
  const Inputs<S>& all_;
  Inputs<S> out_;
};

// ---- Pieces of decode_workload shared with its CUDA twin (cuda/decode.cu) ---------------------

// The per-position outputs of a workload, empty (lse -inf, block_idx -1, the rest 0), after
// checking prefix (one length per sequence, 0 <= prefix[b] <= T_b); *Tmax = the longest sequence.
template <class S>
ForwardResult<S> decode_outputs(const Config& cfg, const Inputs<S>& in, const std::vector<int64_t>& prefix,
                                int64_t* Tmax);

// Row `from` of a per-position tensor [N, ...] into row `to` of another of the same row shape;
// for block_scores [N, Hkv, NB] the source may be narrower (fewer valid blocks): the rest stays.
template <class T>
void copy_row(const Tensor<T>& src, int64_t from, Tensor<T>& dst, int64_t to) {
  const int64_t ns = src.numel() / std::max<int64_t>(src.dim(0), 1), nd = dst.numel() / std::max<int64_t>(dst.dim(0), 1);
  if (src.rank() == 3 && dst.rank() == 3 && src.dim(2) != dst.dim(2)) {  // [*, Hkv, NB]: per KV head
    for (int64_t g = 0; g < src.dim(1); ++g)
      std::copy(src.row(from, g), src.row(from, g) + src.dim(2), dst.row(to, g));
    return;
  }
  std::copy(src.data() + from * ns, src.data() + (from + 1) * ns, dst.data() + to * nd);
}

// Every per-position output of row `from` of a prefill or a step (R: ForwardResult or
// StepResult) into row `to` of a workload's outputs.
template <class S, class R>
void copy_outputs(const R& src, int64_t from, ForwardResult<S>& dst, int64_t to) {
  copy_row(src.o, from, dst.o, to);
  for (int c = 0; c < kBranches; ++c) {
    copy_row(src.o_branch[c], from, dst.o_branch[c], to);
    copy_row(src.lse[c], from, dst.lse[c], to);
  }
  copy_row(src.gates, from, dst.gates, to);
  copy_row(src.block_idx, from, dst.block_idx, to);
  copy_row(src.block_scores, from, dst.block_scores, to);
}

// Step k of a workload (sequence b's first prefix[b] tokens prefilled, cu: its packing): the
// sequences with a token left (active) and the input rows of those tokens; false when none has.
inline bool next_step(const std::vector<int64_t>& cu, const std::vector<int64_t>& prefix, int64_t k,
                      std::vector<int64_t>& active, std::vector<int64_t>& rows) {
  active.clear();
  rows.clear();
  for (size_t b = 0; b + 1 < cu.size(); ++b)
    if (prefix[b] + k < cu[b + 1] - cu[b]) {
      active.push_back(int64_t(b));
      rows.push_back(cu[b] + prefix[b] + k);
    }
  return !active.empty();
}

// A workload's compressed K/V (packed by out.cu_cmp) from the compressed rows its cache holds at
// the end (C: DecodeCache<S>).
template <class S, class C>
void compressed_from_cache(const C& cache, ForwardResult<S>& out) {
  const Config& cfg = cache.cfg;
  const int64_t H = cfg.Hkv;
  out.k_cmp_compressed = Tensor<S>({out.cu_cmp.back(), H, cfg.dk});
  out.v_cmp_compressed = Tensor<S>({out.cu_cmp.back(), H, cfg.dv});
  for (int64_t b = 0; b + 1 < int64_t(out.cu_cmp.size()); ++b) {
    const int64_t nc = out.cu_cmp[b + 1] - out.cu_cmp[b];
    std::copy(cache.cmp_key(b, 0), cache.cmp_key(b, 0) + nc * H * cfg.dk, out.k_cmp_compressed.row(out.cu_cmp[b], 0));
    std::copy(cache.cmp_value(b, 0), cache.cmp_value(b, 0) + nc * H * cfg.dv,
              out.v_cmp_compressed.row(out.cu_cmp[b], 0));
  }
}

// ---- Sizes and traffic: the model, as functions of the cache length -----------------------------

// What the step at cache length s (the new token included, t = s - 1) reads. The selection
// count is exact when local_blocks >= 1 (the own, partly filled block is always selected, the
// other n - 1 are full) and the upper bound n*l' otherwise; decode_step reports the actual count.
StepTokens step_tokens(const Config& cfg, int64_t s);

// Bytes of one sequence's cache at length s, per branch, as stored (element size `elem`).
struct CacheBytes {
  double cmp = 0;   // compressed rows: Nc(s) * Hkv * (dk + dv)
  double tail = 0;  // the compression ring, min(s, l) rows per unshared key/value
  double slc = 0;   // the history: s rows
  double win = 0;   // the window ring, min(s, w) rows per unshared key/value
  double full = 0;  // full attention's cache for comparison: s * Hkv * (dk + dv)
  double total() const { return cmp + tail + slc + win; }
};
CacheBytes cache_bytes(const Config& cfg, const KvSharing& share, int64_t s, int elem);

// Bytes a step reads (StepTokens times Hkv * (dk + dv) * elem); `phi` is phi's parameters, read
// only by a step that emits (mean: none). Queries, gates and outputs are not counted.
struct StepBytes {
  double cmp = 0, slc = 0, win = 0, emit = 0, phi = 0;
  double full = 0;  // full attention's step
  double total() const { return cmp + slc + win + emit + phi; }
};
StepBytes step_bytes(const Config& cfg, const StepTokens& tok, int elem);

// Bytes of phi's parameters for keys and values (pe, weights, biases of the configured kind).
double phi_param_bytes(const Config& cfg, int elem);

}  // namespace nsa::ref
