#include "sweep.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include "cli.hpp"
#include "cost.hpp"
#include "npy.hpp"
#include "timing.hpp"
#include "traffic.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

// ---- Columns -------------------------------------------------------------------------------------

const std::vector<Column>& sweep_columns() {
  using K = ColumnKind;
  static const std::vector<Column> cols = {
      {"workload", K::Text, true, "random, needle, clustered or npy"},
      {"data", K::Text, true, "npy: the folder of q.npy, k.npy, v.npy; else empty"},
      {"T", K::Int, true, "context length (tokens per sequence)"},
      {"depth", K::Real, true, "needle: needle depth in [0, 1]"},
      {"needle_len", K::Int, true, "needle: tokens the needle spans"},
      {"needle_strength", K::Real, true, "needle: logit margin of the needle, in haystack-logit std"},
      {"corr_len", K::Real, true, "clustered: correlation length of the keys' latent process"},
      {"seed", K::Int, true, "seed of the workload and of the drawn phi parameters"},
      {"Hq", K::Int, true, "query heads"},
      {"Hkv", K::Int, true, "key/value heads"},
      {"dk", K::Int, true, "query/key head dim"},
      {"dv", K::Int, true, "value head dim"},
      {"cmp_len", K::Int, true, "l: compression block length"},
      {"cmp_stride", K::Int, true, "d: compression stride"},
      {"slc_len", K::Int, true, "l': selection block length"},
      {"slc_count", K::Int, true, "n: selected blocks per query and group (forced included)"},
      {"window", K::Int, true, "w: sliding window"},
      {"init_blocks", K::Int, true, "always-selected leading blocks"},
      {"local_blocks", K::Int, true, "always-selected blocks ending at the query's block"},
      {"compress", K::Text, true, "phi: mean, linear or mlp"},
      {"compress_params", K::Text, true, "folder of phi parameters; empty: drawn from the seed"},
      {"selector", K::Text, true, "whose blocks recall, mass and needle_found score (analysis/recall.hpp)"},
      {"precision", K::Text, true, "arithmetic of the NSA forward: double or float"},
      {"queries", K::Int, false, "evaluated query rows (needle: the questions; else all tokens)"},
      {"recall", K::Real, false,
       "|S ∩ oracle| / |oracle| of the selector's blocks S, mean over evaluated non-trivial (row, group)"},
      {"mass", K::Real, false, "exact full-attention mass in S's blocks, same mean"},
      {"mass_with_window", K::Real, false, "mass in S's blocks or the window, same mean"},
      {"rel_error", K::Real, false,
       "selector nsa: ||o - o_full|| / ||o_full|| over the evaluated rows, o with every gate 1/3"},
      {"rel_error_cmp", K::Real, false, "the same for O_cmp alone"},
      {"rel_error_slc", K::Real, false, "the same for O_slc alone"},
      {"rel_error_win", K::Real, false, "the same for O_win alone"},
      {"needle_found", K::Real, false,
       "needle: fraction of (question, group) whose selected blocks (S) hold every needle token"},
      {"flops_nsa", K::Real, false, "NSA forward FLOPs of one sequence (analysis/cost.hpp)"},
      {"flops_full", K::Real, false, "full attention forward FLOPs of one sequence"},
      {"flop_ratio", K::Real, false, "flops_full / flops_nsa"},
      {"bytes_nsa", K::Real, false, "modelled HBM bytes of the NSA forward, one sequence, bf16 (analysis/traffic.hpp)"},
      {"bytes_full", K::Real, false, "the same for full attention"},
      {"traffic_ratio", K::Real, false, "bytes_full / bytes_nsa"},
      {"decode_speedup", K::Real, false, "one decode step at cache length T: full's K/V tokens over NSA's (exact count)"},
      {"ms_nsa", K::Real, false, "with --time cpu: median ms of the NSA forward (reference, CPU)"},
      {"ms_full", K::Real, false, "with --time cpu: median ms of full attention (reference, CPU)"},
      {"seconds", K::Real, false, "wall time of the point's evaluation"},
  };
  return cols;
}

// ---- The grid ------------------------------------------------------------------------------------

namespace {

// Cells are written with csv_num (%.10g): short, and the same text for the same parsed value, so a
// key read back from the CSV matches the key of the point that wrote it.
std::string cell_text(const json& v) {
  if (v.is_null()) return "";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_boolean()) return v.get<bool>() ? "1" : "0";
  const double d = v.get<double>();
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  return csv_num(d);
}

// npy workloads: the sequences of a dump, each cut to its first T tokens (T = 0: all).
struct NpyData {
  ref::Inputs<double> in;
  int64_t T = 0;  // tokens per sequence after the cut
};

NpyData load_npy_data(const std::string& dir, int64_t T) {
  NpyData d;
  Tensor<double> t[3];
  const char* names[3] = {"q", "k", "v"};
  int64_t B = 0, Tfile = 0;
  for (int i = 0; i < 3; ++i) {
    const std::string path = (fs::path(dir) / (std::string(names[i]) + ".npy")).string();
    t[i] = load_npy<double>(path);
    if (t[i].rank() != 3 && t[i].rank() != 4)
      throw InputError(cat(path, ": shape ", shape_str(t[i].shape()), ", expected [T, H, D] or [B, T, H, D]"));
    const int64_t b = t[i].rank() == 4 ? t[i].dim(0) : 1, tt = t[i].dim(-3);
    if (i == 0) B = b, Tfile = tt;
    if (b != B || tt != Tfile)
      throw InputError(cat(path, ": shape ", shape_str(t[i].shape()), " does not match q.npy's ", B, " x ", Tfile,
                           " tokens"));
  }
  d.T = T > 0 ? T : Tfile;
  if (d.T > Tfile)
    throw ConfigError(cat("context = ", T, " exceeds the ", Tfile, " tokens per sequence of ", dir, "/q.npy"));
  Tensor<double>* dst[3] = {&d.in.q, &d.in.k, &d.in.v};
  for (int i = 0; i < 3; ++i) {
    const int64_t H = t[i].dim(-2), D = t[i].dim(-1), row = H * D;
    Tensor<double> cut({B * d.T, H, D});
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(t[i].data() + b * Tfile * row, d.T * row, cut.data() + b * d.T * row);
    *dst[i] = std::move(cut);
  }
  if (B > 1)
    for (int64_t b = 0; b <= B; ++b) d.in.cu_seqlens.push_back(b * d.T);
  return d;
}

Config heads_of(const ref::Inputs<double>& in) {
  Config c;
  c.Hq = in.q.dim(1), c.Hkv = in.k.dim(1), c.dk = in.q.dim(2), c.dv = in.v.dim(2);
  return c;
}

std::string workload_key(const SweepPoint& p) {
  json j = point_params(p);
  for (const char* k : {"cmp_len", "cmp_stride", "slc_len", "slc_count", "window", "init_blocks", "local_blocks",
                        "compress", "compress_params", "selector", "precision"})
    j.erase(k);
  return j.dump();
}

double rel_l2_rows(const Tensor<double>& a, const Tensor<double>& b, const std::vector<int64_t>& rows) {
  const int64_t row = b.numel() / b.dim(0);
  double num = 0, den = 0;
  for (int64_t t : rows)
    for (int64_t i = t * row; i < (t + 1) * row; ++i) {
      const double e = a[i] - b[i];
      num += e * e;
      den += b[i] * b[i];
    }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}


}  // namespace

std::vector<SweepPoint> expand(const SweepAxes& a) {
  const bool needle = a.spec.workload == "needle", clustered = a.spec.workload == "clustered",
             npy = a.spec.workload == "npy";
  // Axes that do not apply to the workload collapse to one ignored value.
  const std::vector<double> none{0};
  const auto& depths = needle ? a.depth : none;
  const auto& strengths = needle ? a.needle_strength : none;
  const auto& corrs = clustered ? a.corr_len : none;
  Config heads;
  int64_t file_T = 0;
  if (npy) {
    const NpyData d = load_npy_data(a.data, 0);
    heads = heads_of(d.in);
    file_T = d.T;
    for (int64_t T : a.context)
      if (T < 0 || T > file_T)
        throw ConfigError(cat("context = ", T, " is invalid for ", a.data, ": expected 0 (all) to ", file_T, " tokens"));
  } else {
    heads.Hq = a.spec.Hq, heads.Hkv = a.spec.Hkv, heads.dk = a.spec.dk, heads.dv = a.spec.dv;
  }
  std::vector<SweepPoint> pts;
  for (int64_t T : a.context)
    for (double depth : depths)
      for (double strength : strengths)
        for (double corr : corrs)
          for (int64_t l : a.cmp_len)
            for (int64_t d : a.cmp_stride)
              for (int64_t lp : a.slc_len)
                for (int64_t n : a.slc_count)
                  for (int64_t w : a.window)
                    for (int64_t init : a.init_blocks)
                      for (int64_t local : a.local_blocks)
                        for (const auto& phi : a.compress)
                          for (const auto& sel : a.selector)
                          for (const auto& prec : a.precision) {
                            SweepPoint p;
                            p.spec = a.spec;
                            p.spec.T = npy && T == 0 ? file_T : T;
                            p.spec.depths = {depth};
                            p.spec.needle_strength = strength;
                            p.spec.corr_len = corr;
                            p.data = a.data;
                            p.compress_params = a.compress_params;
                            p.precision = prec;
                            Config& c = p.cfg;
                            c = a.base;
                            c.Hq = heads.Hq, c.Hkv = heads.Hkv, c.dk = heads.dk, c.dv = heads.dv;
                            c.cmp_len = l, c.cmp_stride = d, c.slc_len = lp, c.slc_count = n, c.window = w;
                            c.init_blocks = init, c.local_blocks = local;
                            c.compress = parse_compress_kind(phi);
                            p.selector = analysis::parse_selector(sel);
                            try {
                              if (prec != "double" && prec != "float")
                                throw ConfigError(cat("precision = '", prec, "' is not one of: double, float"));
                              c.validate();
                              if (!npy) validate(p.spec);
                            } catch (const ConfigError& e) {
                              throw ConfigError(cat("sweep point ", row_key(point_params(p)), ": ", e.what()));
                            }
                            pts.push_back(std::move(p));
                          }
  return pts;
}

json point_params(const SweepPoint& p) {
  const auto& s = p.spec;
  const bool needle = s.workload == "needle", clustered = s.workload == "clustered";
  // The Config's fields as config.json and the results files write them (config_json), those the
  // sweep has columns for.
  json j = config_json(p.cfg);
  for (auto it = j.begin(); it != j.end();) {
    const auto& cols = sweep_columns();
    const bool param =
        std::any_of(cols.begin(), cols.end(), [&](const Column& c) { return c.param && c.name == it.key(); });
    it = param ? std::next(it) : j.erase(it);
  }
  j.update(json{{"workload", s.workload},
                {"data", p.data},
                {"T", s.T},
                {"depth", needle ? json(s.depths.at(0)) : json()},
                {"needle_len", needle ? json(s.needle_len) : json()},
                {"needle_strength", needle ? json(s.needle_strength) : json()},
                {"corr_len", clustered ? json(s.corr_len) : json()},
                {"seed", s.seed},
                {"compress_params", p.compress_params},
                {"selector", analysis::to_string(p.selector)},
                {"precision", p.precision}});
  return j;
}

std::string row_key(const json& row) {
  std::string k;
  for (const auto& c : sweep_columns())
    if (c.param) k += cat(c.name, "=", row.contains(c.name) ? cell_text(row.at(c.name)) : std::string(), ";");
  return k;
}

// ---- Workloads -----------------------------------------------------------------------------------

WorkloadData load_workload_data(const SweepPoint& p) {
  WorkloadData w;
  if (p.spec.workload == "npy") {
    NpyData d = load_npy_data(p.data, p.spec.T);
    w.in = std::move(d.in);
  } else {
    const Generated g = generate(p.spec);
    w.in.q = g.at("q");
    w.in.k = g.at("k");
    w.in.v = g.at("v");
    if (p.spec.workload == "needle") w.needle = needle_layout(p.spec);
  }
  w.heads = heads_of(w.in);
  w.heads.compress = CompressKind::Mean;
  w.heads.validate();
  const int64_t N = w.in.N();
  if (w.needle)
    for (int64_t t = w.needle->first_question; t < N; ++t) w.rows.push_back(t);
  else
    for (int64_t t = 0; t < N; ++t) w.rows.push_back(t);
  w.full = ref::full_attention(w.heads, w.in.q, w.in.k, w.in.v, w.in.cu_seqlens);
  return w;
}

struct WorkloadCache::Entry {
  std::shared_future<std::shared_ptr<const WorkloadData>> data;
};

WorkloadCache::WorkloadCache(const std::vector<SweepPoint>& points) {
  for (const auto& p : points) ++uses_[workload_key(p)];
}

std::shared_ptr<const WorkloadData> WorkloadCache::get(const SweepPoint& p) {
  const std::string key = workload_key(p);
  std::promise<std::shared_ptr<const WorkloadData>> promise;
  std::shared_ptr<Entry> e;
  bool mine = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = entries_[key];
    if (!slot) {
      slot = std::make_shared<Entry>();
      slot->data = promise.get_future().share();
      mine = true;
    }
    e = slot;
  }
  if (mine) {  // the first point of this workload computes it; the others wait on the future
    try {
      promise.set_value(std::make_shared<const WorkloadData>(load_workload_data(p)));
    } catch (...) {
      promise.set_exception(std::current_exception());
    }
  }
  return e->data.get();
}

void WorkloadCache::release(const SweepPoint& p) {
  const std::string key = workload_key(p);
  std::lock_guard<std::mutex> lock(mu_);
  if (--uses_[key] <= 0) entries_.erase(key);
}

// ---- One point -----------------------------------------------------------------------------------

namespace {

template <class S>
json evaluate_as(const SweepPoint& p, const WorkloadData& w, const Timing& timing) {
  const Config& c = p.cfg;
  ref::Inputs<double> ind = w.in;
  if (c.compress != CompressKind::Mean)
    ind.phi = p.compress_params.empty() ? ref::random_compress_params<double>(c, p.spec.seed)
                                        : load_compress_params(p.compress_params, c.compress);
  // rel_error's gates: every gate 1/3, so o is the mean of the three branch outputs, each of which
  // approximates full attention on its own (with all-ones gates o would be about 3 o_full).
  ind.gates = Tensor<double>({ind.N(), c.Hq, 3}, 1.0 / 3);
  ref::check_inputs(c, ind, false, [&](const std::string& role) {
    return p.compress_params.empty() ? role : (fs::path(p.compress_params) / (role + ".npy")).string();
  });
  const ref::Inputs<S> in = ind.template cast<S>();
  const auto r = ref::forward(c, in);
  json row = point_params(p);
  const size_t R = w.rows.size();
  row["queries"] = int64_t(R);
  const bool nsa = p.selector == analysis::Selector::Nsa;
  const char* err_cols[] = {"rel_error", "rel_error_cmp", "rel_error_slc", "rel_error_win"};
  for (const char* col : err_cols) row[col] = nullptr;
  if (nsa) {  // the output is NSA's own: the other selectors do not change it
    row["rel_error"] = rel_l2_rows(r.o.template cast<double>(), w.full.o, w.rows);
    for (int b = 0; b < kBranches; ++b)
      row[err_cols[1 + b]] = rel_l2_rows(r.o_branch[b].template cast<double>(), w.full.o, w.rows);
  }

  // recall, mass, mass_with_window of the selector's blocks (the analysis library), averaged over
  // the evaluated rows that have more than n valid blocks (at the others every selector takes
  // every block: analysis/recall.hpp's "trivial" positions).
  analysis::RecallOptions ropt;
  ropt.selectors = {p.selector};
  ropt.keep_selections = true;
  ropt.seed = p.spec.seed;
  ref::ForwardResult<double> sel;  // recall() reads only block_idx (NSA's selection)
  sel.block_idx = r.block_idx;
  const auto rec = analysis::recall(c, ind, sel, ropt);
  const auto& map = rec.map(p.selector);
  double rc = 0, ms = 0, mw = 0;
  int64_t pairs = 0;
  for (int64_t t : w.rows)
    if (!rec.trivial[t])
      for (int64_t g = 0; g < c.Hkv; ++g, ++pairs) {
        rc += map.recall(t, g);
        ms += map.mass(t, g);
        mw += map.mass_with_window(t, g);
      }
  row["recall"] = pairs ? json(rc / double(pairs)) : json();
  row["mass"] = pairs ? json(ms / double(pairs)) : json();
  row["mass_with_window"] = pairs ? json(mw / double(pairs)) : json();

  if (w.needle) {
    // The needle is found by (question t, group g) when every needle token lies in a block the
    // selector picked for t's group (forced blocks count: they are selected).
    int64_t found = 0;
    for (int64_t t : w.rows)
      for (int64_t g = 0; g < c.Hkv; ++g)
        found += needle_found(map.idx.row(t, g), c.slc_count, w.needle->start.at(0), w.needle->len, c.slc_len);
    row["needle_found"] = double(found) / double(R * size_t(c.Hkv));
  } else {
    row["needle_found"] = nullptr;
  }
  // Costs of one sequence of T tokens (a multi-sequence npy dump: each sequence costs the same).
  const int64_t T = w.in.cu_seqlens.empty() ? w.in.N() : w.in.cu_seqlens[1];
  const double f_nsa = analysis::nsa_forward_flops(c, T).total(), f_full = analysis::full_forward_flops(c, T);
  row["flops_nsa"] = f_nsa;
  row["flops_full"] = f_full;
  row["flop_ratio"] = f_full / f_nsa;
  // Memory traffic of the GPU kernels as modelled (bf16, group-centric loading).
  const auto tr = analysis::prefill_traffic(c, T, 1, 2);
  row["bytes_nsa"] = tr.nsa().bytes;
  row["bytes_full"] = tr.full.bytes;
  row["traffic_ratio"] = tr.full.bytes / tr.nsa().bytes;
  row["decode_speedup"] = analysis::decode_traffic(c, T, 1, 2).expected_speedup();
  if (timing.enabled) {
    row["ms_nsa"] = median_ms([&] { (void)ref::forward(c, in); }, timing.warmup, timing.reps);
    const auto q = w.in.q.template cast<S>(), k = w.in.k.template cast<S>(), v = w.in.v.template cast<S>();
    row["ms_full"] = median_ms([&] { (void)ref::full_attention(c, q, k, v, w.in.cu_seqlens); }, timing.warmup, timing.reps);
  } else {
    row["ms_nsa"] = nullptr;
    row["ms_full"] = nullptr;
  }
  return row;
}

}  // namespace

json evaluate(const SweepPoint& p, const WorkloadData& w, const Timing& timing) {
  const auto t0 = std::chrono::steady_clock::now();
  json row = p.precision == "float" ? evaluate_as<float>(p, w, timing) : evaluate_as<double>(p, w, timing);
  row["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

// ---- Files ---------------------------------------------------------------------------------------

namespace {

std::string csv_escape(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string o = "\"";
  for (char ch : s) o += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return o + "\"";
}

std::vector<std::string> csv_split(const std::string& line) {
  std::vector<std::string> cells(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char ch = line[i];
    if (quoted) {
      if (ch == '"' && i + 1 < line.size() && line[i + 1] == '"') cells.back() += '"', ++i;
      else if (ch == '"') quoted = false;
      else cells.back() += ch;
    } else if (ch == '"') {
      quoted = true;
    } else if (ch == ',') {
      cells.emplace_back();
    } else {
      cells.back() += ch;
    }
  }
  return cells;
}

}  // namespace

std::string sweep_csv(const std::vector<json>& rows) {
  std::ostringstream os;
  const auto& cols = sweep_columns();
  for (size_t i = 0; i < cols.size(); ++i) os << (i ? "," : "") << cols[i].name;
  os << "\n";
  for (const auto& r : rows) {
    for (size_t i = 0; i < cols.size(); ++i)
      os << (i ? "," : "") << csv_escape(r.contains(cols[i].name) ? cell_text(r.at(cols[i].name)) : "");
    os << "\n";
  }
  return os.str();
}

std::vector<json> read_sweep_csv(const std::string& path) {
  std::vector<json> rows;
  std::ifstream f(path);
  if (!f) return rows;
  const auto& cols = sweep_columns();
  std::string line;
  if (!std::getline(f, line)) return rows;
  const auto header = csv_split(line);
  std::vector<std::string> want;
  for (const auto& c : cols) want.push_back(c.name);
  if (header != want)
    throw InputError(cat(path, ": its columns are not this version's sweep columns; resume needs the same columns "
                               "(move the file away to start a new sweep)"));
  for (int64_t ln = 2; std::getline(f, line); ++ln) {
    if (line.empty()) continue;
    const auto cells = csv_split(line);
    if (cells.size() != cols.size())
      throw InputError(cat(path, ": line ", ln, " has ", cells.size(), " cells, expected ", cols.size()));
    json r = json::object();
    for (size_t i = 0; i < cols.size(); ++i) {
      const std::string& s = cells[i];
      if (s.empty() && cols[i].kind != ColumnKind::Text) {
        r[cols[i].name] = nullptr;
        continue;
      }
      try {
        switch (cols[i].kind) {
          case ColumnKind::Text: r[cols[i].name] = s; break;
          case ColumnKind::Int: r[cols[i].name] = std::stoll(s); break;
          case ColumnKind::Real: r[cols[i].name] = std::stod(s); break;
        }
      } catch (const std::exception&) {
        throw InputError(cat(path, ": line ", ln, ", column ", cols[i].name, ": '", s, "' is not a number"));
      }
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

}  // namespace nsa::cli
