// The parameters every forward kernel receives by value: shapes and plain device pointers, the
// shape written on each field (FlashMLA style). `elem` pointers hold the operand precision of the
// run (bf16, fp16 or fp32; the kernels are templated on it); `float` pointers are always fp32.
// Rows are packed sequences: token row r of sequence b is cu_seqlens[b] + t, 0 <= t < T_b.
#pragma once

#include <cstdint>

#include "config.hpp"

namespace nsa::cuda {

// The layer's shapes and NSA settings under Config's names (core/config.hpp; the paper's symbol
// after each), built from a Config once by layer_params and shared by the forward, backward and
// decode kernels.
struct LayerParams {
  int Hq = 0, Hkv = 0, G = 0;  // query heads, key/value heads, G = Hq / Hkv
  int dk = 0, dv = 0;          // head dims
  int cmp_len = 0;             // l: compression block length
  int cmp_stride = 0;          // d: compression stride
  int slc_len = 0;             // l': selection block length
  int slc_count = 0;           // n: selected blocks per query and group, forced included
  int init_blocks = 0, local_blocks = 0;
  int window = 0;              // w
  float scale = 0;             // softmax scale
};

inline LayerParams layer_params(const Config& cfg) {
  LayerParams p;
  p.Hq = int(cfg.Hq), p.Hkv = int(cfg.Hkv), p.G = int(cfg.G()), p.dk = int(cfg.dk), p.dv = int(cfg.dv);
  p.cmp_len = int(cfg.cmp_len), p.cmp_stride = int(cfg.cmp_stride);
  p.slc_len = int(cfg.slc_len), p.slc_count = int(cfg.slc_count);
  p.init_blocks = int(cfg.init_blocks), p.local_blocks = int(cfg.local_blocks), p.window = int(cfg.window);
  p.scale = float(cfg.softmax_scale());
  return p;
}

struct FwdParams : LayerParams {
  // ---- the packing (docs/spec.md names) ----
  int B = 0;        // packed sequences
  int64_t N = 0;    // tokens in all
  int64_t Nc = 0;   // compressed rows in all (sum over sequences of num_cmp_blocks(T_b))
  int Tmax = 0;     // longest sequence
  int NB = 0;       // selection blocks of the longest sequence, ceil(Tmax / l')
  const int64_t* cu_seqlens = nullptr;  // [B+1]
  const int64_t* cu_cmp = nullptr;      // [B+1] first compressed row of each sequence

  // ---- inputs ----
  const void* q = nullptr;      // [N, Hq, dk]  elem
  const void* k_cmp = nullptr;  // [N, Hkv, dk] elem  raw keys of the compression branch
  const void* v_cmp = nullptr;  // [N, Hkv, dv] elem
  const void* k_slc = nullptr;  // [N, Hkv, dk] elem  (may alias k_cmp: shared K/V)
  const void* v_slc = nullptr;  // [N, Hkv, dv] elem
  const void* k_win = nullptr;  // [N, Hkv, dk] elem
  const void* v_win = nullptr;  // [N, Hkv, dv] elem
  const float* gates = nullptr; // [N, Hq, 3] fp32, order (cmp, slc, win)

  // ---- intermediates and outputs ----
  void* kc = nullptr;            // [Nc, Hkv, dk] elem  compressed keys phi(k_cmp)
  void* vc = nullptr;            // [Nc, Hkv, dv] elem  compressed values
  void* o = nullptr;             // [N, Hq, dv] elem    Eq. 5
  void* o_cmp = nullptr;         // [N, Hq, dv] elem
  void* o_slc = nullptr;         // [N, Hq, dv] elem
  void* o_win = nullptr;         // [N, Hq, dv] elem    nullptr: not stored (fused into o)
  float* lse_cmp = nullptr;      // [N, Hq]  natural log; -inf where no key is visible
  float* lse_slc = nullptr;      // [N, Hq]
  float* lse_win = nullptr;      // [N, Hq]
  int32_t* block_idx = nullptr;  // [N, Hkv, n]  ascending, -1 padding at the end
  float* block_scores = nullptr; // [N, Hkv, NB] Eq. 10, 0 for invalid blocks; nullptr: not stored
};

// The backward kernels' parameters (docs/spec.md 7), beside the FwdParams of the forward run they
// differentiate (its inputs and what it saved: lse, branch outputs, block_idx, compressed K/V,
// gates). Gradients are fp32. Per branch c, dO_c = g_c dL/do is never stored: kernels scale dL/do
// by the gate of the row as they read it.
struct BwdParams {
  const void* dO = nullptr;  // [N, Hq, dv] elem  dL/do
  float* delta = nullptr;    // [3, N, Hq]  D_c = g_c <dL/do, O_c> = rowsum(dO_c * O_c) (FlashAttention-2)
  float* dgates = nullptr;   // [N, Hq, 3]  dL/dg_c = <dL/do, O_c>
  float* dq = nullptr;       // [N, Hq, dk]
  float* dk[3] = {nullptr, nullptr, nullptr};  // [N, Hkv, dk]  dL/dk_c; [0] = through phi to k_cmp
  float* dv[3] = {nullptr, nullptr, nullptr};  // [N, Hkv, dv]
  float* dkc = nullptr;      // [Nc, Hkv, dk]  dL/d phi(k_cmp), the compressed keys
  float* dvc = nullptr;      // [Nc, Hkv, dv]
  bool deterministic = false;  // no floating-point atomics: partial sums added in a fixed order

  // ---- selection lists: for (sequence b, group g, block j), the positions that selected j ----
  // Positions are cut into chunks of QS; slot (b, g, j, c) counts the positions of chunk c that
  // selected j, and the lists are the slots laid end to end (counting sort, no atomics).
  int QS = 0;                           // positions per chunk
  const int64_t* cu_chunks = nullptr;   // [B+1] prefix sums of ceil(T_b / QS)
  const int64_t* cu_slots = nullptr;    // [B+1] prefix sums of Hkv * NB_b * ceil(T_b / QS)
  const int64_t* cu_lists = nullptr;    // [B+1] prefix sums of Hkv * NB_b (list (b, g, j) = cu_lists[b] + g NB_b + j)
  int32_t* slot_cnt = nullptr;          // [slots + 1]
  int32_t* slot_off = nullptr;          // [slots + 1] exclusive prefix sums of slot_cnt
  int32_t* list = nullptr;              // [N * Hkv * n] sequence-local positions, ascending per list
  int64_t nlists = 0;                   // lists in all
  // mma: work items of the selection's key-centric kernel, up to S positions of one list each.
  int S = 0;
  int32_t* item_cnt = nullptr;  // [nlists + 1] items of each list
  int32_t* item_off = nullptr;  // [nlists + 1] exclusive prefix sums: list L's items are [off[L], off[L+1])
  // mma: work items of the compression's key-centric kernel: (b, tile of 64 compressed keys,
  // chunk of QC positions), item (b, kt, c) = cu_cmp_items[b] + kt * ceil(T_b / QC) + c.
  int QC = 0;
  const int64_t* cu_cmp_items = nullptr;  // [B+1]
  // mma, deterministic: each item's partial dK, dV of its 64 key slots, summed in item order.
  float* part_k = nullptr;  // [items, 64, dk]
  float* part_v = nullptr;  // [items, 64, dv]
};

#ifdef __CUDACC__
#define NSA_HD __host__ __device__
#else
#define NSA_HD
#endif

// Config::num_cmp_blocks in int, for host and device.
NSA_HD inline int num_cmp_blocks(int T, int l, int d) { return T >= l ? (T - l) / d + 1 : 0; }

}  // namespace nsa::cuda

namespace nsa::cuda {

// The parameters of the decode-step kernels (cuda/decode_attn.cu): the device cache in the layout
// of ref::DecodeCache (reference/decode.hpp), the step's rows, its outputs, and the split-softmax
// partials. One step appends one token to each of Bs cache sequences; row r of the step goes to
// cache sequence seq[r] at position pos[r] (the cache held pos[r] tokens before the step). An
// item is a (row, KV group) pair, item = r * Hkv + g: the G query heads of the group share every
// K/V row the item reads (group-centric).
struct DecParams : LayerParams {  // G <= 16
  // ---- the step and the cache ----
  int Bs = 0;            // rows of this step
  int64_t capacity = 0;  // tokens per cache sequence
  int Ncap = 0;          // compressed rows per cache sequence, Nc(capacity)
  int L = 0, W = 0;      // rows of the compression tail ring (min(l, capacity)) and window ring (min(w, capacity))
  int NBs = 0;           // columns of block_scores this step: max over rows of slc_valid(pos)

  // ---- the cache (elem = the operand precision) ----
  void* k_cmp = nullptr;   // [B, Ncap, Hkv, dk]  compressed keys, row i = phi(raw keys [i*d, i*d + l))
  void* v_cmp = nullptr;   // [B, Ncap, Hkv, dv]
  void* k_tail = nullptr;  // [B, L, Hkv, dk]  ring, token u at slot u % l; nullptr: shared, read k_slc
  void* v_tail = nullptr;  // [B, L, Hkv, dv]
  void* k_slc = nullptr;   // [B, capacity, Hkv, dk]  the full raw history, token u at row u
  void* v_slc = nullptr;   // [B, capacity, Hkv, dv]
  void* k_win = nullptr;   // [B, W, Hkv, dk]  ring, token u at slot u % w; nullptr: shared, read k_slc
  void* v_win = nullptr;   // [B, W, Hkv, dv]

  // ---- the step's rows ----
  const int32_t* seq = nullptr;  // [Bs] cache sequence of row r
  const int32_t* pos = nullptr;  // [Bs] position t of row r's token
  const void* q = nullptr;       // [Bs, Hq, dk] elem
  const void* k_new[3] = {};     // [Bs, Hkv, dk] elem: the new token's keys per branch (cmp, slc, win),
  const void* v_new[3] = {};     // [Bs, Hkv, dv] elem  aliases where a branch shares the selection's
  const float* gates = nullptr;  // [Bs, Hq, 3] fp32, order (cmp, slc, win)

  // ---- outputs ----
  void* o = nullptr;              // [Bs, Hq, dv] elem  Eq. 5
  void* o_cmp = nullptr;          // [Bs, Hq, dv] elem
  void* o_slc = nullptr;          // [Bs, Hq, dv] elem
  void* o_win = nullptr;          // [Bs, Hq, dv] elem
  float* lse_cmp = nullptr;       // [Bs, Hq]  natural log; -inf where no key is visible
  float* lse_slc = nullptr;       // [Bs, Hq]
  float* lse_win = nullptr;       // [Bs, Hq]
  int32_t* block_idx = nullptr;   // [Bs, Hkv, n]  ascending, -1 padding at the end
  float* block_scores = nullptr;  // [Bs, Hkv, NBs] Eq. 10, 0 for invalid blocks (the top-n reads them back)

  // ---- split softmax (flash-decoding): each branch's key list of an item is cut into splits of
  // r* keys, one CTA each; partial slot s of an item: cmp splits [0, sc), window [sc, sc + sw),
  // selection [sc + sw, S), S = sc + sw + ss ----
  int sc = 0, sw = 0, ss = 0;   // splits per item of the compression, window and selection branch
  int rc = 0, rw = 0, rs = 0;   // keys per split (multiples of 32)
  float* part_ml = nullptr;     // [Bs*Hkv, S, 2, 16]  per query row: max m (log2 domain), sum l of exp2(x - m)
  float* part_o = nullptr;      // [Bs*Hkv, S, 16, dv] per query row: sum of exp2(x - m) v (unnormalised)
  float* scores = nullptr;      // [Bs*Hkv, G, Ncs]    s q.k of every compressed row (log2 domain), for Eq. 8-10
  int Ncs = 0;                  // row stride of scores: Ncap rounded up to a multiple of 4 (aligned pairs)
  int jb = 1;                   // selection blocks per CTA of the selection kernel (Eq. 8-10)
  int* sel_arrive = nullptr;    // [Bs*Hkv] CTAs of the selection kernel done with an item (0 between steps)
  bool append = true;           // the first split kernel also writes the new token's rows into the cache
  int kernel = 2;               // split kernel version (Options::decode_kernel): 1, 2 or 3
  bool evict_first = true;      // the split kernels' K/V loads ask L2 to evict their lines first
};

}  // namespace nsa::cuda
