// `nsa compare A B`: two .npy files, or two output folders file by file. Prints, per file, the
// max abs error with its index, the relative L2 error, and PASS/FAIL; exits 1 on any FAIL.
// The rules (allclose or rel_l2 for floats, equality for ints, near-ties of block_idx judged by
// B's folder's block_scores.npy) are core/compare.hpp's, shared with the Python binding.
#include <algorithm>
#include <filesystem>
#include <iostream>

#include "cli.hpp"
#include "commands.hpp"
#include "compare.hpp"
#include "npy.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

namespace {

bool is_int(DType t) { return t == DType::I32 || t == DType::I64; }

// Compares one pair of files; prints one line; returns PASS.
bool compare_files(const std::string& pa, const std::string& pb, const std::string& label, const CompareTolerance& tol,
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
  const CompareResult r = [&] {
    if (A.shape != B.shape) return compare_shape_mismatch(label, A.shape, B.shape);
    if (is_int(A.dtype) != is_int(B.dtype)) return compare_kind_mismatch(label, dtype_name(A.dtype), dtype_name(B.dtype));
    if (!is_int(A.dtype)) return compare_float(label, npy_to_tensor<double>(A, pa), npy_to_tensor<double>(B, pb), tol);
    const bool blocks = fs::path(pa).stem() == "block_idx";
    Tensor<double> scores;
    const bool have = blocks && !scores_path.empty() && fs::exists(scores_path);
    if (have) scores = load_npy<double>(scores_path);
    return compare_int(label, npy_to_tensor<int64_t>(A, pa), npy_to_tensor<int64_t>(B, pb), tol, blocks,
                       have ? &scores : nullptr, " (no block_scores.npy beside B to check near-ties)");
  }();
  std::cout << r.line << "\n";
  return r.pass;
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
  const CompareTolerance tol = make_compare_tolerance(vm["rtol"].as<double>(), vm["atol"].as<double>(),
                                                     vm["tie-tol"].as<double>(), vm["metric"].as<std::string>());
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
