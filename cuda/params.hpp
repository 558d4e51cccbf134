// The parameters every forward kernel receives by value: shapes and plain device pointers, the
// shape written on each field (FlashMLA style). `elem` pointers hold the operand precision of the
// run (bf16, fp16 or fp32; the kernels are templated on it); `float` pointers are always fp32.
// Rows are packed sequences: token row r of sequence b is cu_seqlens[b] + t, 0 <= t < T_b.
#pragma once

#include <cstdint>

namespace nsa::cuda {

struct FwdParams {
  // ---- shapes (NSA-SPEC.md names) ----
  int B = 0;        // packed sequences
  int64_t N = 0;    // tokens in all
  int64_t Nc = 0;   // compressed rows in all (sum over sequences of num_cmp_blocks(T_b))
  int Tmax = 0;     // longest sequence
  int Hq = 0, Hkv = 0, G = 0;  // query heads, key/value heads, G = Hq / Hkv
  int dk = 0, dv = 0;          // head dims
  int l = 0, d = 0;            // compression block length and stride
  int ls = 0, n = 0;           // selection block length l' and count n
  int init_blocks = 0, local_blocks = 0;
  int w = 0;                   // window
  int NB = 0;                  // selection blocks of the longest sequence, ceil(Tmax / l')
  float scale = 0;             // softmax scale
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

// The backward kernels' parameters (NSA-SPEC.md 7), beside the FwdParams of the forward run they
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
  // v1: work items of the selection's key-centric kernel, up to S positions of one list each.
  int S = 0;
  int32_t* item_cnt = nullptr;  // [nlists + 1] items of each list
  int32_t* item_off = nullptr;  // [nlists + 1] exclusive prefix sums: list L's items are [off[L], off[L+1])
  // v1: work items of the compression's key-centric kernel: (b, tile of 64 compressed keys,
  // chunk of QC positions), item (b, kt, c) = cu_cmp_items[b] + kt * ceil(T_b / QC) + c.
  int QC = 0;
  const int64_t* cu_cmp_items = nullptr;  // [B+1]
  // v1, deterministic: each item's partial dK, dV of its 64 key slots, summed in item order.
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
