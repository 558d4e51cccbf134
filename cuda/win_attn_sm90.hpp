// Sliding-window attention (NSA-SPEC.md 5: row t sees the raw keys u in [max(0, t - w + 1), t])
// fused with the gated combine of Eq. 5 (o = g_cmp O_cmp + g_slc O_slc + g_win O_win), on Hopper's
// own instructions: wgmma for both products, TMA for the K/V tiles, a producer warpgroup and two
// consumer warpgroups (docs/cuda_sm90.md). The sm_90a twin of the window kernels of window.cu: it
// runs last in the forward, after O_cmp and O_slc are written.
//
// The parameters are plain device pointers and shapes; the caller needs no CUDA type beyond
// cudaStream_t. Rows are packed sequences as in FwdParams (params.hpp): token row r of sequence b
// is cu_seqlens[b] + t, 0 <= t < T_b; the window never crosses a sequence's start.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cmp_attn_sm90.hpp"  // Sm90Elem

namespace nsa::cuda {

struct WinAttnSm90Params {
  // ---- shapes (NSA-SPEC.md names) ----
  int B = 0;                  // packed sequences
  int64_t N = 0;              // tokens in all (< 2^31: TMA coordinates are int32)
  int Hq = 0, Hkv = 0, G = 0; // G = Hq / Hkv, one of 1, 2, 4, 8, 16
  int dk = 0, dv = 0;         // (128, 128) or (192, 128)
  int w = 0;                  // window, >= 1 (w >= T: every causal key)
  float scale = 0;            // softmax scale
  Sm90Elem elem = Sm90Elem::BF16;       // operand precision of q, k_win, v_win, o_cmp, o_slc, o, o_win
  const int64_t* cu_seqlens = nullptr;  // [B+1] device
  // Tiles of win_attn_sm90_tile_positions(G) consecutive positions of one sequence, as TileMap
  // (kernels.hpp): tile x is sequence b = the largest b with cu_tiles[b] <= x.
  const int64_t* cu_tiles = nullptr;    // [B+1] device, prefix sums of ceil(T_b / BT)
  int64_t tiles = 0;                    // tiles in all (cu_tiles[B])

  // ---- inputs ----
  const void* q = nullptr;      // [N, Hq, dk]  elem
  const void* k_win = nullptr;  // [N, Hkv, dk] elem  raw keys of the window branch; 16-byte aligned
  const void* v_win = nullptr;  // [N, Hkv, dv] elem  16-byte aligned
  const float* gates = nullptr; // [N, Hq, 3] fp32, order (cmp, slc, win)
  const void* o_cmp = nullptr;  // [N, Hq, dv] elem  the other branches' outputs (written before)
  const void* o_slc = nullptr;  // [N, Hq, dv] elem

  // ---- outputs ----
  void* o = nullptr;           // [N, Hq, dv] elem  Eq. 5
  float* lse_win = nullptr;    // [N, Hq] fp32      natural log (every row sees key t: finite)
  void* o_win = nullptr;       // [N, Hq, dv] elem  nullptr: not stored (fused into o)

  // ---- variant (0: the measured best, win_attn_sm90_resolve; docs/cuda_sm90.md) ----
  int block_n = 0;  // keys per tile: 64 or 128
  int stages = 0;   // K/V pipeline depth
  bool persistent = true;  // one CTA per SM walking the work items, else one CTA per item
};

// Positions per tile (work item): 128 rows = positions x the G heads of one KV group.
int win_attn_sm90_tile_positions(int G);

// p with block_n and stages filled in where 0.
WinAttnSm90Params win_attn_sm90_resolve(const WinAttnSm90Params& p);

// True when this build has the kernel for the current device (sm_90a code, compute capability
// 9.0) and these parameters; otherwise false with the reason in *why.
bool win_attn_sm90_supported(const WinAttnSm90Params& p, std::string* why);

// Launches the kernel on s (CTAs of 384 threads). Throws ConfigError when unsupported (the reason
// of win_attn_sm90_supported), CudaError on a failed launch.
void win_attn_sm90(const WinAttnSm90Params& p, cudaStream_t s);

}  // namespace nsa::cuda
