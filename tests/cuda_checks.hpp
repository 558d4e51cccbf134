// Selection checks shared by the CUDA tests (forward and decode): the device's block lists
// compared with the reference's up to recorded near-ties, and with the tie rule applied to the
// device's own scores. (The double twin of the selection attention fed the device's lists, which
// keeps a near-tie difference from hiding or excusing an error in the attention, is in
// cuda_twins.hpp.)
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "cuda_twins.hpp"
#include "helpers.hpp"
#include "nsa_ref.hpp"
#include "tolerances.hpp"

namespace nsa::test {

struct SelectCheck {
  int64_t rows = 0, differ = 0, near_ties = 0, bad = 0, self_bad = 0;
};

// Row `row` of the lists belongs to a query at position pos[row]. The device's list must equal
// ref::select_blocks of the device's own scores (self_bad counts those that do not); where it
// differs from the reference's, every differing block's reference score must lie within
// tie * |n-th score| of the reference's n-th (lowest non-forced) score (near_ties), else bad.
inline SelectCheck check_lists(const Config& c, const std::vector<int64_t>& pos, const Tensor<int32_t>& got_idx,
                               const Tensor<float>& got_scores, const Tensor<int32_t>& want_idx,
                               const Tensor<double>& want_scores, double tie) {
  SelectCheck s;
  const int64_t N = got_idx.dim(0), n = c.slc_count;
  for (int64_t row = 0; row < N; ++row) {
    const int64_t t = pos[size_t(row)];
    for (int64_t g = 0; g < c.Hkv; ++g) {
      ++s.rows;
      std::vector<int32_t> got(got_idx.row(row, g), got_idx.row(row, g) + n);
      // The tie rule, exactly: the device's list is select_blocks of the device's own scores.
      std::vector<int32_t> self = ref::select_blocks<float>(c, t, got_scores.row(row, g));
      self.resize(size_t(n), -1);
      s.self_bad += self != got;
      std::vector<int32_t> want(want_idx.row(row, g), want_idx.row(row, g) + n);
      if (want == got) continue;
      ++s.differ;
      // The reference's n-th score: the lowest score among its non-forced picks.
      const int64_t own = t / c.slc_len;
      auto forced = [&](int64_t j) { return j < c.init_blocks || (j > own - c.local_blocks && j <= own); };
      const double* P = want_scores.row(row, g);
      double nth = std::numeric_limits<double>::infinity();
      for (int32_t j : want)
        if (j >= 0 && !forced(j)) nth = std::min(nth, P[j]);
      std::set<int32_t> a(want.begin(), want.end()), bset(got.begin(), got.end());
      bool near = std::isfinite(nth);
      for (int32_t j : got)
        if (!a.count(j)) near = near && j >= 0 && j <= t / c.slc_len && std::abs(P[j] - nth) <= tie * std::abs(nth);
      for (int32_t j : want)
        if (!bset.count(j)) near = near && std::abs(P[j] - nth) <= tie * std::abs(nth);
      near ? ++s.near_ties : ++s.bad;
    }
  }
  return s;
}

// check_lists over every position of packed sequences (cu: [B+1] offsets).
inline SelectCheck check_selection(const Config& c, const std::vector<int64_t>& cu, const ref::ForwardResult<float>& gpu,
                                   const ref::ForwardResult<double>& r, double tie) {
  std::vector<int64_t> pos(size_t(gpu.block_idx.dim(0)));
  for (int64_t row = 0; row < int64_t(pos.size()); ++row) pos[size_t(row)] = row - cu[size_t(seq_of(cu, row))];
  return check_lists(c, pos, gpu.block_idx, gpu.block_scores, r.block_idx, r.block_scores, tie);
}

// Every stage of a device result (the forward pass, or a decode workload's outputs) against the
// reference in double on the same rounded inputs, each to its tolerance (tolerances.hpp): phi,
// the gates, cmp_attn, topn (the scores; the lists up to near-ties and by the tie rule), slc_attn
// (against the twin fed the device's lists, so that a near-tie can neither hide nor excuse an
// error), win_attn and combine (Eq. 5 with the reference's gates and branches, the selection's
// from the twin). Returns the errors for the test's report.
struct StageErrors {
  double k_cmp = 0, v_cmp = 0, gates = 0, o_cmp = 0, lse_cmp = 0, scores = 0, o_slc = 0, lse_slc = 0, o_win = 0,
         lse_win = 0, o = 0;
  SelectCheck sel;
};
inline StageErrors check_stages(const Config& c, const ref::Inputs<double>& in, const ref::ForwardResult<float>& gpu,
                                const ref::ForwardResult<double>& r, const tol::Tolerances& tl) {
  StageErrors e;
  // phi
  e.k_cmp = rel_l2(gpu.k_cmp_compressed, r.k_cmp_compressed);
  e.v_cmp = rel_l2(gpu.v_cmp_compressed, r.v_cmp_compressed);
  CHECK(gpu.cu_cmp == r.cu_cmp);
  CHECK(e.k_cmp <= tl.compress);
  CHECK(e.v_cmp <= tl.compress);
  // combine's gates
  e.gates = rel_l2(gpu.gates, r.gates);
  CHECK(e.gates <= tol::kGates);
  // cmp_attn
  e.o_cmp = rel_l2(gpu.o_branch[0], r.o_branch[0]), e.lse_cmp = rel_l2(gpu.lse[0], r.lse[0]);
  CHECK(e.o_cmp <= tl.attn);
  CHECK(e.lse_cmp <= tl.lse);
  // topn
  e.scores = rel_l2(gpu.block_scores, r.block_scores);
  CHECK(e.scores <= tl.scores);
  e.sel = check_selection(c, in.seqlens_or_single(), gpu, r, tl.tie);
  CHECK(e.sel.self_bad == 0);
  CHECK(e.sel.bad == 0);
  // slc_attn, against the twin fed the device's lists
  Tensor<double> o_s, lse_s;
  slc_twin(c, in, gpu.block_idx, o_s, lse_s);
  e.o_slc = rel_l2(gpu.o_branch[1], o_s), e.lse_slc = rel_l2(gpu.lse[1], lse_s);
  CHECK(e.o_slc <= tl.attn);
  CHECK(e.lse_slc <= tl.lse);
  // win_attn
  e.o_win = rel_l2(gpu.o_branch[2], r.o_branch[2]), e.lse_win = rel_l2(gpu.lse[2], r.lse[2]);
  CHECK(e.o_win <= tl.attn);
  CHECK(e.lse_win <= tl.lse);
  // combine: Eq. 5 with the reference's gates and branches (the selection's from the twin)
  Tensor<double> o_want(r.o.shape());
  for (int64_t i = 0; i < o_want.numel(); ++i) {
    const int64_t th = i / c.dv;
    o_want[i] = r.gates[th * 3] * r.o_branch[0][i] + r.gates[th * 3 + 1] * o_s[i] + r.gates[th * 3 + 2] * r.o_branch[2][i];
  }
  e.o = rel_l2(gpu.o, o_want);
  CHECK(e.o <= tl.attn);
  return e;
}

// The report of check_stages, one line per stage.
inline std::string stage_report(const StageErrors& e, const tol::Tolerances& tl) {
  const SelectCheck& s = e.sel;
  return cat("\n  phi       k ", e.k_cmp, "  v ", e.v_cmp, "  (tol ", tl.compress, ")", "\n  cmp_attn  o ", e.o_cmp,
             "  lse ", e.lse_cmp, "  (tol ", tl.attn, ", ", tl.lse, ")", "\n  topn      scores ", e.scores, " (tol ",
             tl.scores, "); lists equal ", s.rows - s.differ, "/", s.rows, ", near-ties ", s.near_ties, ", wrong ",
             s.bad, ", off own scores ", s.self_bad, "\n  slc_attn  o ", e.o_slc, "  lse ", e.lse_slc,
             "\n  win_attn  o ", e.o_win, "  lse ", e.lse_win, "\n  combine   o ", e.o, "  gates ", e.gates);
}

}  // namespace nsa::test
