// `nsa compare A B`: two .npy files, or two output folders file by file. Prints, per file, the
// max abs error with its index, the relative L2 error, and PASS/FAIL; exits 1 on any FAIL.
//   float tensors: PASS when every element has |a - b| <= atol + rtol * |b| (numpy.allclose,
//                  B is the reference), or with --metric rel_l2 when ||a - b|| / ||b|| <= rtol;
//                  NaN never passes; equal infinities (lse of an empty branch) match.
//   int tensors:   exact equality; block_idx rows that differ pass only at near-ties, when B's
//                  folder has block_scores and every differing block's score lies within
//                  --tie-tol (relative) of the n-th selected score (NSA-SPEC.md 4).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <set>

#include "cli.hpp"
#include "commands.hpp"
#include "npy.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

namespace {

struct Tolerance {
  double rtol, atol, tie_tol;
  bool rel_l2_metric;
};

bool is_int(DType t) { return t == DType::I32 || t == DType::I64; }

// Rows of block_idx [..., n] that differ, checked against B's block_scores [..., NB].
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

// Compares one pair of files; prints one line; returns PASS.
bool compare_files(const std::string& pa, const std::string& pb, const std::string& label, const Tolerance& tol,
                   const std::string& scores_path) {
  // Both files and their values in double (in int64 for index files) are held at once, with B's
  // block scores for block_idx: refused before reading when that cannot fit.
  const NpyHeader ha = read_npy_header(pa), hb = read_npy_header(pb);
  MemoryBudget budget;
  budget.add("the two files", double(ha.data_bytes) + double(hb.data_bytes));
  budget.add("their values in 8 bytes each", 8.0 * (double(numel(ha.shape)) + double(numel(hb.shape))));
  if (fs::path(pa).stem() == "block_idx" && !scores_path.empty() && fs::exists(scores_path)) {
    const NpyHeader hs = read_npy_header(scores_path);
    budget.add("block scores", double(hs.data_bytes) + 8.0 * double(numel(hs.shape)));
  }
  budget.require();
  const NpyArray A = read_npy(pa), B = read_npy(pb);
  std::cout << std::setprecision(3);
  if (A.shape != B.shape) {
    std::cout << "FAIL " << label << "  shape " << shape_str(A.shape) << " vs " << shape_str(B.shape) << "\n";
    return false;
  }
  if (is_int(A.dtype) != is_int(B.dtype)) {
    std::cout << "FAIL " << label << "  dtype " << dtype_name(A.dtype) << " vs " << dtype_name(B.dtype) << "\n";
    return false;
  }
  if (is_int(A.dtype)) {
    const auto a = npy_to_tensor<int64_t>(A, pa), b = npy_to_tensor<int64_t>(B, pb);
    int64_t mismatches = 0, first = -1;
    for (int64_t i = 0; i < a.numel(); ++i)
      if (a[i] != b[i] && (++mismatches, first < 0)) first = i;
    if (!mismatches) {
      std::cout << "PASS " << label << "  shape " << shape_str(A.shape) << "  equal\n";
      return true;
    }
    const bool blocks = fs::path(pa).stem() == "block_idx" && a.rank() >= 2;
    if (blocks) {
      Tensor<double> scores;
      const bool have = !scores_path.empty() && fs::exists(scores_path);
      if (have) scores = load_npy<double>(scores_path);
      int64_t rows = 0;
      std::string note;
      const bool ok = near_ties_only(a, b, have ? &scores : nullptr, tol.tie_tol, rows, note);
      std::cout << (ok ? "PASS " : "FAIL ") << label << "  shape " << shape_str(A.shape) << "  " << rows
                << " rows select other blocks"
                << (ok ? cat(", all at near-ties (within ", tol.tie_tol, " of the n-th score)")
                       : have ? ": " + note : " (no block_scores.npy beside B to check near-ties)")
                << "\n";
      return ok;
    }
    std::cout << "FAIL " << label << "  shape " << shape_str(A.shape) << "  " << mismatches << " of " << a.numel()
              << " differ, first at " << index_str(A.shape, first) << " (" << a[first] << " vs " << b[first] << ")\n";
    return false;
  }
  const auto a = npy_to_tensor<double>(A, pa), b = npy_to_tensor<double>(B, pb);
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
  std::cout << (ok ? "PASS " : "FAIL ") << label << "  shape " << shape_str(A.shape) << "  max_abs " << max_abs;
  if (worst >= 0) std::cout << " at " << index_str(A.shape, worst);
  std::cout << "  rel_l2 " << rel;
  if (nonfinite) std::cout << "  " << nonfinite << " NaN/Inf mismatches, first at " << index_str(A.shape, worst_violation);
  if (!tol.rel_l2_metric && violations)
    std::cout << "  " << violations << " elements outside atol + rtol*|b|, worst at " << index_str(A.shape, worst_violation);
  std::cout << "\n";
  return ok;
}

}  // namespace

int cmd_compare(const Args& args) {
  Command cmd("compare",
              "Compare A against the reference B: two .npy files, or two output folders file by file.\n"
              "usage: nsa compare A B [--rtol R] [--atol A] [--metric allclose|rel_l2] [--tie-tol X]");
  po::options_description o("Comparison");
  o.add_options()("paths", po::value<std::vector<std::string>>(), "A B: files or folders")(
      "rtol", po::value<double>()->default_value(1e-5), "relative tolerance")(
      "atol", po::value<double>()->default_value(1e-8), "absolute tolerance (allclose metric)")(
      "metric", po::value<std::string>()->default_value("allclose"),
      "allclose: every |a-b| <= atol + rtol*|b|; rel_l2: ||a-b||/||b|| <= rtol")(
      "tie-tol", po::value<double>()->default_value(1e-3),
      "block_idx rows may differ where scores are within this relative distance of the n-th");
  cmd.add(o);
  cmd.positional("paths", 2);
  const auto vm = cmd.parse(args);
  if (!vm.count("paths") || vm["paths"].as<std::vector<std::string>>().size() != 2)
    throw UsageError("give two paths: A (to check) and B (the reference)");
  const auto paths = vm["paths"].as<std::vector<std::string>>();
  const std::string metric = vm["metric"].as<std::string>();
  if (metric != "allclose" && metric != "rel_l2") throw ConfigError(cat("metric = '", metric, "' is not one of: allclose, rel_l2"));
  const Tolerance tol{vm["rtol"].as<double>(), vm["atol"].as<double>(), vm["tie-tol"].as<double>(), metric == "rel_l2"};
  for (const auto& [name, x] : {std::pair{"rtol", tol.rtol}, {"atol", tol.atol}, {"tie-tol", tol.tie_tol}})
    if (!(x >= 0) || !std::isfinite(x)) throw ConfigError(cat(name, " = ", x, " is invalid: expected a finite value >= 0"));
  const fs::path A = paths[0], B = paths[1];
  for (const auto& p : {A, B})
    if (!fs::exists(p)) throw InputError(cat(p.string(), ": no such file or folder"));
  bool all_ok = true;
  if (fs::is_directory(A) != fs::is_directory(B))
    throw InputError(cat("compare a file with a file or a folder with a folder: ", A.string(), " and ", B.string()));
  if (!fs::is_directory(A)) {
    all_ok = compare_files(A.string(), B.string(), A.filename().string(), tol, (B.parent_path() / "block_scores.npy").string());
  } else {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(A))
      if (e.path().extension() == ".npy") names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    if (names.empty()) throw InputError(cat(A.string(), ": no .npy files to compare"));
    int compared = 0;
    for (const auto& n : names) {
      if (!fs::exists(B / n)) {
        std::cout << "FAIL " << n << "  missing in " << B.string() << "\n";
        all_ok = false;
        continue;
      }
      all_ok = compare_files((A / n).string(), (B / n).string(), n, tol, (B / "block_scores.npy").string()) && all_ok;
      ++compared;
    }
    std::cout << compared << " files compared\n";
  }
  std::cout << (all_ok ? "PASS" : "FAIL") << "\n";
  return all_ok ? 0 : 1;
}

}  // namespace nsa::cli
