// Compression attention (NSA-SPEC.md 3: O_cmp and its lse over the visible compressed keys) on
// Hopper's own instructions: wgmma for both products, TMA for the K/V tiles, a producer warp and
// two consumer warpgroups (docs/cuda_sm90.md). Only O_cmp and lse_cmp: the scores and the top-n
// (Eq. 8-11) stay with cmp_score_v4, which reads this lse.
//
// The parameters are plain device pointers and shapes (the shape on every field); the caller needs
// no CUDA type beyond cudaStream_t. Rows are packed sequences as in FwdParams (params.hpp): token
// row r of sequence b is cu_seqlens[b] + t, 0 <= t < T_b, and the compressed rows of sequence b
// start at cu_cmp[b].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace nsa::cuda {

enum class Sm90Elem { BF16, FP16 };

struct CmpAttnSm90Params {
  // ---- shapes (NSA-SPEC.md names) ----
  int B = 0;                  // packed sequences
  int64_t N = 0;              // tokens in all
  int64_t Nc = 0;             // compressed rows in all (sum over sequences of num_cmp_blocks(T_b))
  int Hq = 0, Hkv = 0, G = 0; // G = Hq / Hkv, one of 1, 2, 4, 8, 16
  int dk = 0, dv = 0;         // (128, 128) or (192, 128)
  int l = 0, d = 0;           // compression block length and stride: row t sees block i iff i d + l - 1 <= t
  float scale = 0;            // softmax scale
  Sm90Elem elem = Sm90Elem::BF16;  // operand precision of q, kc, vc and o_cmp
  const int64_t* cu_seqlens = nullptr;  // [B+1] device
  const int64_t* cu_cmp = nullptr;      // [B+1] device, first compressed row of each sequence
  // Tiles of cmp_attn_sm90_tile_positions(G) consecutive positions of one sequence, as TileMap
  // (kernels.hpp): tile x is sequence b = the largest b with cu_tiles[b] <= x.
  const int64_t* cu_tiles = nullptr;    // [B+1] device, prefix sums of ceil(T_b / BT)
  int64_t tiles = 0;                    // tiles in all (cu_tiles[B])

  // ---- inputs ----
  const void* q = nullptr;   // [N, Hq, dk]   elem
  const void* kc = nullptr;  // [Nc, Hkv, dk] elem  compressed keys phi(k_cmp); 16-byte aligned
  const void* vc = nullptr;  // [Nc, Hkv, dv] elem  compressed values; 16-byte aligned

  // ---- outputs ----
  void* o_cmp = nullptr;     // [N, Hq, dv] elem   0 where no key is visible
  float* lse_cmp = nullptr;  // [N, Hq] fp32       natural log; -inf where no key is visible

  // ---- variant (0 / true: the measured best, cmp_attn_sm90_resolve; docs/cuda_sm90.md) ----
  int block_n = 0;    // keys per tile: 64 or 128; 0: 128 for dk = 128, 64 for dk = 192
  int stages = 0;     // K/V pipeline depth: 2 or 3; 0: 2 for dk = 128, 3 for dk = 192
  bool overlap = true;  // softmax of tile k under P V of tile k - 1 (FlashAttention-3's intra-warpgroup overlap)
  bool persistent = true;  // one CTA per SM walking the work items, else one CTA per item
  // Q loaded with cp.async (all of an item's copies in flight) instead of one load at a time.
  // EXPERIMENTAL: compiled, not yet run on a GPU (docs/cuda_sm90.md); off until measured.
  bool q_async = false;
};

// Positions per tile (work item): 128 rows = positions x the G heads of one KV group.
int cmp_attn_sm90_tile_positions(int G);

// p with block_n and stages filled in where 0 (the defaults above).
CmpAttnSm90Params cmp_attn_sm90_resolve(const CmpAttnSm90Params& p);

// True when this build has the kernel for the current device (sm_90a code, compute capability
// 9.0) and these parameters; otherwise false with the reason in *why.
bool cmp_attn_sm90_supported(const CmpAttnSm90Params& p, std::string* why);

// Launches the kernel on s (CTAs of 384 threads: one per SM, or one per (tile, group) item). Throws ConfigError when
// unsupported (the reason of cmp_attn_sm90_supported), CudaError on a failed launch.
void cmp_attn_sm90(const CmpAttnSm90Params& p, cudaStream_t s);

}  // namespace nsa::cuda
