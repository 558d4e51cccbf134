// `nsa sweep`: a grid of NSA configurations x workloads, one row of metrics per point
// (docs/experiments.md, "nsa sweep"). This header is the sweep's machinery, apart from the
// command line so that tests can drive it: the grid, the fixed columns, one point's evaluation,
// and the CSV that makes a sweep resumable.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config.hpp"
#include "nsa_ref.hpp"
#include "recall.hpp"
#include "workloads.hpp"

namespace nsa::cli {

using json = nlohmann::json;

// ---- Columns -------------------------------------------------------------------------------------

enum class ColumnKind { Text, Int, Real };
struct Column {
  const char* name;
  ColumnKind kind;
  bool param;       // a parameter of the point (part of its key) or a measured value
  const char* doc;  // one line for docs/experiments.md and --help
};
// The fixed columns of sweep.csv and of each record of sweep.json, in order.
const std::vector<Column>& sweep_columns();

// ---- The grid ------------------------------------------------------------------------------------

// Every axis is a list; the grid is their cartesian product (expand()). Single-valued settings
// (heads, dims, seed, needle length, ...) sit in `base` and `spec`.
struct SweepAxes {
  GenSpec spec;                  // the workload's fixed settings (workload, heads, dims, seed, ...)
  std::string data;              // npy workload: folder with q.npy, k.npy, v.npy
  Config base;                   // block settings not swept (cmp_hidden, cmp_act, scale)
  std::string compress_params;   // folder of phi parameters; empty: drawn from the seed
  std::vector<int64_t> context;  // T; for npy, the first T tokens of each sequence (0: all)
  std::vector<double> depth;             // needle
  std::vector<double> needle_strength;   // needle
  std::vector<double> corr_len;          // clustered
  std::vector<int64_t> cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks;
  std::vector<std::string> compress;
  std::vector<std::string> selector;     // analysis::Selector names: nsa, oracle, quest, ...
  std::vector<std::string> precision;    // double or float
};

struct SweepPoint {
  GenSpec spec;                 // T = the context; depths = {depth} for needle
  std::string data;             // npy folder, empty for synthetic workloads
  Config cfg;                   // complete (heads filled in from the workload)
  std::string compress_params;  // empty: phi drawn from spec.seed
  analysis::Selector selector = analysis::Selector::Nsa;  // whose blocks recall/mass/needle_found score
  std::string precision;        // double or float
};

// The grid in a fixed order (the last axis varies fastest: the order of SweepAxes' fields).
// Points whose settings are invalid (init + local > n, d > l, ...) throw ConfigError naming the
// point: a grid is checked whole before anything runs. Heads and dims of an npy workload come
// from its files.
std::vector<SweepPoint> expand(const SweepAxes& axes);

// The point's parameter columns (the key), as a JSON object; cells that do not apply to the
// workload are null (depth for random, ...).
json point_params(const SweepPoint& p);
// A row's key: its parameter cells as they are written in the CSV, joined. Equal keys are the
// same point.
std::string row_key(const json& row);

// ---- Evaluating a point --------------------------------------------------------------------------

// What every point of one workload shares: the inputs, full attention (double), and the query
// rows the metrics average over.
struct WorkloadData {
  ref::Inputs<double> in;           // q, k, v (phi and gates are set per point)
  Config heads;                     // Hq, Hkv, dk, dv of the workload
  ref::FullResult<double> full;     // full causal attention, the reference output
  std::vector<int64_t> rows;        // evaluated query rows: the questions (needle), else all
  std::optional<NeedleLayout> needle;
};
WorkloadData load_workload_data(const SweepPoint& p);

// Loads or computes each workload once, shared by the points (and threads) that need it, and
// drops it when its last point is done.
class WorkloadCache {
 public:
  explicit WorkloadCache(const std::vector<SweepPoint>& points);
  std::shared_ptr<const WorkloadData> get(const SweepPoint& p);
  void release(const SweepPoint& p);

 private:
  struct Entry;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> entries_;
  std::map<std::string, int> uses_;
};

struct Timing {
  bool enabled = false;
  int warmup = 1, reps = 3;
};

// One row: the point's parameters and every metric column (docs/experiments.md).
json evaluate(const SweepPoint& p, const WorkloadData& w, const Timing& timing);

// ---- Files ---------------------------------------------------------------------------------------

std::string sweep_csv(const std::vector<json>& rows);
// Rows of a sweep.csv written by sweep_csv (cells parsed back by their column's kind); an absent
// file gives none. A file whose header is not sweep_columns() is refused: it was written by
// another version, and mixing would corrupt it.
std::vector<json> read_sweep_csv(const std::string& path);

}  // namespace nsa::cli
