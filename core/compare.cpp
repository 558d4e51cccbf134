// The rules of `nsa compare` on tensors in memory (compare.hpp).
#include "compare.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <set>
#include <iomanip>
#include <sstream>
#include <vector>

namespace nsa {

namespace {

// Rows of block_idx [..., n] that differ, checked against B's block scores [..., NB].
bool near_ties_only(const Tensor<int64_t>& a, const Tensor<int64_t>& b, const Tensor<double>* scores, double tie_tol,
                    int64_t& rows_differ, std::string& note) {
  const int64_t n = a.dim(-1), rows = a.numel() / std::max<int64_t>(n, 1);
  rows_differ = 0;
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    std::set<int64_t> sa, sb;
    for (int64_t m = 0; m < n; ++m) {
      if (a[r * n + m] >= 0) sa.insert(a[r * n + m]);
      if (b[r * n + m] >= 0) sb.insert(b[r * n + m]);
    }
    if (sa == sb) continue;
    ++rows_differ;
    if (!scores) {
      ok = false;
      continue;
    }
    const int64_t NB = scores->dim(-1);
    const double* P = scores->data() + r * NB;
    double nth = std::numeric_limits<double>::infinity();
    for (int64_t j : sb)
      if (j < NB) nth = std::min(nth, P[j]);
    std::vector<int64_t> diff;
    std::set_symmetric_difference(sa.begin(), sa.end(), sb.begin(), sb.end(), std::back_inserter(diff));
    for (int64_t j : diff)
      if (j >= NB || std::abs(P[j] - nth) > tie_tol * std::abs(nth)) {
        ok = false;
        if (note.empty()) note = cat("row ", index_str(Shape(a.shape().begin(), a.shape().end() - 1), r), " block ", j,
                                     " is not a near-tie");
      }
  }
  return ok;
}

std::ostringstream line_stream() {
  std::ostringstream os;
  os << std::setprecision(3);
  return os;
}

}  // namespace

CompareTolerance make_compare_tolerance(double rtol, double atol, double tie_tol, const std::string& metric) {
  if (metric != "allclose" && metric != "rel_l2")
    throw ConfigError(cat("metric = '", metric, "' is not one of: allclose, rel_l2"));
  for (const auto& [name, x] : {std::pair{"rtol", rtol}, {"atol", atol}, {"tie-tol", tie_tol}})
    if (!(x >= 0) || !std::isfinite(x)) throw ConfigError(cat(name, " = ", x, " is invalid: expected a finite value >= 0"));
  return {rtol, atol, tie_tol, metric == "rel_l2"};
}

CompareResult compare_shape_mismatch(const std::string& label, const Shape& a, const Shape& b) {
  return {false, cat("FAIL ", label, "  shape ", shape_str(a), " vs ", shape_str(b))};
}

CompareResult compare_kind_mismatch(const std::string& label, const char* a_dtype, const char* b_dtype) {
  return {false, cat("FAIL ", label, "  dtype ", a_dtype, " vs ", b_dtype)};
}

CompareResult compare_int(const std::string& label, const Tensor<int64_t>& a, const Tensor<int64_t>& b,
                          const CompareTolerance& tol, bool block_idx, const Tensor<double>* scores,
                          const std::string& no_scores_note) {
  if (a.shape() != b.shape()) return compare_shape_mismatch(label, a.shape(), b.shape());
  auto os = line_stream();
  int64_t mismatches = 0, first = -1;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (a[i] != b[i] && (++mismatches, first < 0)) first = i;
  if (!mismatches) {
    os << "PASS " << label << "  shape " << shape_str(a.shape()) << "  equal";
    return {true, os.str()};
  }
  if (block_idx && a.rank() >= 2) {
    int64_t rows = 0;
    std::string note;
    const bool ok = near_ties_only(a, b, scores, tol.tie_tol, rows, note);
    os << (ok ? "PASS " : "FAIL ") << label << "  shape " << shape_str(a.shape()) << "  " << rows
       << " rows select other blocks"
       << (ok ? cat(", all at near-ties (within ", tol.tie_tol, " of the n-th score)")
              : scores ? ": " + note : no_scores_note);
    return {ok, os.str()};
  }
  os << "FAIL " << label << "  shape " << shape_str(a.shape()) << "  " << mismatches << " of " << a.numel()
     << " differ, first at " << index_str(a.shape(), first) << " (" << a[first] << " vs " << b[first] << ")";
  return {false, os.str()};
}

CompareResult compare_float(const std::string& label, const Tensor<double>& a, const Tensor<double>& b,
                            const CompareTolerance& tol) {
  if (a.shape() != b.shape()) return compare_shape_mismatch(label, a.shape(), b.shape());
  double max_abs = 0, num = 0, den = 0;
  int64_t worst = -1, violations = 0, nonfinite = 0, worst_violation = -1;
  double worst_excess = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a[i], y = b[i];
    if (!(std::isfinite(x) && std::isfinite(y)) && !(x == y)) {  // a NaN, or unequal infinities
      ++nonfinite;
      if (worst_violation < 0) worst_violation = i;
      continue;
    }
    if (x == y) {
      if (std::isfinite(y)) den += y * y;
      continue;
    }
    const double e = std::abs(x - y);
    num += e * e;
    den += y * y;
    if (e > max_abs) max_abs = e, worst = i;
    const double excess = e - (tol.atol + tol.rtol * std::abs(y));
    if (excess > 0 && (++violations, excess > worst_excess)) worst_excess = excess, worst_violation = i;
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const bool ok = nonfinite == 0 && (tol.rel_l2_metric ? rel <= tol.rtol : violations == 0);
  auto os = line_stream();
  const Shape& s = a.shape();
  os << (ok ? "PASS " : "FAIL ") << label << "  shape " << shape_str(s) << "  max_abs " << max_abs;
  if (worst >= 0) os << " at " << index_str(s, worst);
  os << "  rel_l2 " << rel;
  if (nonfinite) os << "  " << nonfinite << " NaN/Inf mismatches, first at " << index_str(s, worst_violation);
  if (!tol.rel_l2_metric && violations)
    os << "  " << violations << " elements outside atol + rtol*|b|, worst at " << index_str(s, worst_violation);
  return {ok, os.str(), max_abs, rel};
}

}  // namespace nsa
