// The selection scores and top-n of the compression branch (NSA-SPEC.md 4, Eq. 8-11) on Hopper's
// own instructions, the sm_90a twin of cmp_score_v4 (cmp_attn.cu): with lse_cmp known (from
// cmp_attn_sm90 or cmp_fa_v4), s = q.k once more over the visible compressed keys by wgmma (K
// tiles by TMA, a producer warp and two consumer warpgroups, as cmp_attn_sm90), p = exp(scale s -
// lse), summed over the G heads of the group (Eq. 10), mapped onto the selection blocks (Eq. 9),
// then the top-n per position with the forced blocks (Eq. 11). docs/cuda_sm90.md.
//
// Plain device pointers and shapes, as CmpAttnSm90Params; rows are packed sequences (token row r
// of sequence b is cu_seqlens[b] + t), compressed rows of sequence b start at cu_cmp[b].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cmp_attn_sm90.hpp"  // Sm90Elem

namespace nsa::cuda {

struct TopnSm90Params {
  // ---- shapes (NSA-SPEC.md names) ----
  int B = 0;                  // packed sequences
  int64_t N = 0;              // tokens in all
  int64_t Nc = 0;             // compressed rows in all
  int Hq = 0, Hkv = 0, G = 0; // G = Hq / Hkv, one of 1, 2, 4, 8, 16
  int dk = 0;                 // 128 or 192
  int l = 0, d = 0;           // compression block length and stride
  int ls = 0, n = 0;          // selection block length l' and count n
  int init_blocks = 0, local_blocks = 0;  // forced blocks (counted within n)
  int NB = 0;                 // selection blocks of the longest sequence, ceil(Tmax / l')
  float scale = 0;            // softmax scale (the one lse_cmp was computed with)
  Sm90Elem elem = Sm90Elem::BF16;
  const int64_t* cu_seqlens = nullptr;  // [B+1] device
  const int64_t* cu_cmp = nullptr;      // [B+1] device
  // Tiles of topn_sm90_tile_positions(G) = 128 / G positions of one sequence: the same TileMap as
  // cmp_attn_sm90's (tile x is sequence b = the largest b with cu_tiles[b] <= x).
  const int64_t* cu_tiles = nullptr;    // [B+1] device
  int64_t tiles = 0;

  // ---- inputs ----
  const void* q = nullptr;        // [N, Hq, dk]   elem
  const void* kc = nullptr;       // [Nc, Hkv, dk] elem  16-byte aligned
  const float* lse_cmp = nullptr; // [N, Hq] fp32 natural log, -inf where no key is visible

  // ---- outputs ----
  int32_t* block_idx = nullptr;   // [N, Hkv, n]  ascending, -1 padding at the end
  float* block_scores = nullptr;  // [N, Hkv, NB] Eq. 10, 0 for invalid blocks; nullptr: not stored

  // ---- variant (0: the default, topn_sm90_resolve) ----
  int block_n = 0;  // keys per tile: 64 or 128; 0: 128 for dk = 128, 64 for dk = 192
  int stages = 0;   // K pipeline depth: 2, 3 or 4 (compiled pairs: NSA_TOPN_SM90_VARIANTS); 0: 2 for dk = 128, 3 for dk = 192
  // Q loaded with cp.async (all of an item's copies in flight, one memory latency) instead of one
  // 16-byte load and store at a time (cmp_attn_sm90's measured loader).
  bool q_async = true;
  // false: the block scores alone (written where block_scores is given), no top-n and no
  // block_idx; the harness times it to measure the top-n's share.
  bool select = true;
};

int topn_sm90_tile_positions(int G);
TopnSm90Params topn_sm90_resolve(const TopnSm90Params& p);
// Dynamic shared memory the kernel asks for (bytes), 0 where no variant matches.
size_t topn_sm90_smem(const TopnSm90Params& p);
// True when this build has the kernel for the current device and parameters (the per-CTA score
// array, 128 / G positions x NB floats, must fit in shared memory beside the K ring: at NB = 1024
// G = 16 and 8 fit, G <= 4 do not); otherwise false with the reason in *why.
bool topn_sm90_supported(const TopnSm90Params& p, std::string* why);
// Launches on s (one CTA of 384 threads per SM). Throws ConfigError when unsupported.
void topn_sm90(const TopnSm90Params& p, cudaStream_t s);

}  // namespace nsa::cuda
