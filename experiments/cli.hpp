// The `nsa` command's shared machinery (docs/interface.md): option groups, INI config files, the
// resolved-config JSON, loading a workload into reference inputs, and all-or-nothing output.
// Each subcommand lives in its own cmd_<name>.cpp and registers in main.cpp.
#pragma once

#include <boost/program_options.hpp>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "config.hpp"
#include "nsa_ref.hpp"
#ifdef NSA_WITH_CUDA
#include "nsa_cuda.hpp"
#endif

namespace nsa::cli {

namespace po = boost::program_options;
using json = nlohmann::json;

// Thrown after --help has been printed: the command exits 0.
struct HelpShown {};
// A usage error (unknown option, missing required value): printed with the usage hint, exit 2.
struct UsageError : Error {
  using Error::Error;
};

// One subcommand's parser: its option groups, --help, --config FILE (INI; the command line wins),
// --verbose (print the resolved configuration to stderr).
class Command {
 public:
  Command(std::string name, std::string summary);
  po::options_description& options() { return opts_; }
  void add(const po::options_description& group) { opts_.add(group); }
  void positional(const char* name, int max_count) { pos_.add(name, max_count); }
  // Parses argv (without the program and subcommand names). Throws HelpShown or UsageError.
  po::variables_map parse(const std::vector<std::string>& args);
  const std::string& name() const { return name_; }
  std::string usage() const;

 private:
  std::string name_, summary_;
  po::options_description opts_;
  po::positional_options_description pos_;
};

// ---- Option groups shared by the subcommands (docs/interface.md, "Common options") ----
po::options_description input_options();    // --q --k --v, per-branch K/V, gates, --cu-seqlens
po::options_description nsa_options();      // l, d, l', n, w, forced blocks, phi, scale
po::options_description run_options();      // --precision, --dtype, --device, --threads, --path, ...
po::options_description output_options();   // --out
// The CUDA kernels' options: --variant, --warps (in run_options); --bwd-variant (backward, bench);
// --dec-kernel, --dec-waves, --dec-pdl, --dec-evict-first (decode, bench).
po::options_description variant_options();
po::options_description bwd_variant_options();
po::options_description decode_kernel_options();
// Checks whichever of those options the command has (in every build, CUDA or not).
void check_cuda_options(const po::variables_map& vm);
#ifdef NSA_WITH_CUDA
// The cuda::Options of those options and --dtype.
cuda::Options cuda_options(const po::variables_map& vm);
// What ran, per stage: {"cmp_attn": {"variant": "mma", "warps": 4, "why": ...}, ..., "backward": ...}
// (config.json's "cuda" and the results files' records).
json kernels_json(const cuda::KernelChoice& k);
#endif

// For the commands with run_options(): applies --threads (0: all cores; refused outside [0, 1024])
// and returns the thread count in effect; checks --dtype and the CUDA kernels' options, which only
// the CUDA path reads, so that a typo is refused on the CPU too. (--device, --precision, --path are checked
// where they are read.)
int apply_run_options(const po::variables_map& vm);

// --cmp-act and --gate-act: the activation, or a ConfigError naming the option.
Activation activation_option(const po::variables_map& vm, const char* opt);

// The Config from the options and the tensors' shapes (Hq, dk from q; Hkv from k; dv from v).
// Validated; errors name the option.
Config make_config(const po::variables_map& vm, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv);
// The NSA block settings alone (no head counts), validated with placeholder heads.
Config block_config(const po::variables_map& vm);

// ---- Memory: a run that cannot fit is refused before it allocates ----------------------------

// The parts of a run's peak memory, added up and checked against what the machine has.
class MemoryBudget {
 public:
  void add(const std::string& part, double bytes) { parts_.emplace_back(part, bytes); }
  double total() const;
  // Throws ResourceError when total() exceeds available_memory(), naming the bytes needed (by
  // part) and the bytes available.
  void require() const;
  json to_json() const;  // {"estimate_bytes": total, "parts": {part: bytes}}

 private:
  std::vector<std::pair<std::string, double>> parts_;
};

// Free memory: the least of MemAvailable (/proc/meminfo), the cgroup's limit less its usage, and
// the environment variable NSA_MAX_MEMORY (bytes), which caps what nsa may plan to use.
struct AvailableMemory {
  double bytes;
  std::string source;  // which of the three limits it is
};
AvailableMemory available_memory();
double available_memory_bytes();
// Throws ResourceError naming `what` and the bytes needed when they exceed what is free.
void require_memory(double bytes, const std::string& what);
// "34.4 GB", "1.5 MB": for messages.
std::string human_bytes(double bytes);
// The process's peak resident memory so far (getrusage), in bytes.
double peak_rss_bytes();

// What a workload's files hold, known from their headers before anything large is loaded.
struct WorkloadSizes {
  Config cfg;
  int64_t N = 0, batch = 0;
  std::vector<int64_t> seqlens;
  int64_t gate_hidden = 0;  // the gate MLP's hidden width (d_hidden, or d_model without one); 0: none
  double input_bytes = 0;   // the loaded inputs, in double
};
// A command's own memory (its outputs and working memory) for a workload of these sizes.
using MemoryPlan = std::function<void(const WorkloadSizes& sizes, MemoryBudget& budget)>;

// A workload loaded from the files named by the options: tensors in double, packed to [N, H, D]
// (a [B, T, H, D] batch becomes B sequences of T), checked against the config; errors name the
// file. `batch` is B for a rank-4 batch and 0 for packed/single sequences.
struct Workload {
  Config cfg;
  ref::Inputs<double> in;
  int64_t batch = 0;
  std::vector<int64_t> seqlens;  // per sequence
  json memory;                   // the memory estimate and the RSS before loading (memory_report)
};


// Loads the workload in three steps: every file's header (so a missing, malformed, misshapen or
// mismatched file is named before anything is read), the memory check (the inputs in double,
// plus the command's `plan`), then the data (NaN/Inf refused at their first position in the
// file's own coordinates unless --allow-nonfinite), and ref::check_inputs.
// With nsa = false (full attention) only the head layout and --scale are read.
Workload load_workload(const po::variables_map& vm, bool nsa = true, const MemoryPlan& plan = nullptr);
// For config.json: the workload's memory estimate by part, the RSS before loading, and the peak
// RSS now, so that every run records how the estimate compares with what it really used.
json memory_report(const Workload& w);

// phi's parameter files in a --compress-params folder (docs/interface.md): pe_k, then w_k, b_k
// (linear) or w1_k, b1_k, w2_k, b2_k (mlp), then the same for _v; none for mean.
std::vector<std::string> compress_param_names(CompressKind kind);
// Loads them (shapes are checked later by ref::check_inputs, which names the file).
ref::CompressParams<double> load_compress_params(const std::string& dir, CompressKind kind);
// Files of an output folder that appear all together or not at all: each is written to a
// temporary name as it is added, and `commit()` renames them all into place (and writes
// config.json). If the command fails before commit, the destructor removes the temporaries and
// the folders it created, so a failed run leaves nothing behind.
class OutputDir {
 public:
  explicit OutputDir(std::string dir);
  ~OutputDir();
  template <class T>
  void add(const std::string& name, const Tensor<T>& t);  // name without ".npy"
  void add_text(const std::string& filename, const std::string& text);
  void commit();
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  // Opens a temporary file for `filename`, registered for commit or removal.
  std::ofstream stage(const std::string& filename, std::string& final_path);
  std::vector<std::pair<std::string, std::string>> staged_;  // temporary path, final path
  std::vector<std::string> created_;                         // folders this created, outermost first
  bool committed_ = false;
};

// Adds phi's parameters as the files load_compress_params reads.
template <class S>
void add_compress_params(OutputDir& out, const ref::CompressParams<S>& phi, CompressKind kind);

// The resolved configuration: every option's value (given, from --config, or default), plus the
// derived quantities the caller adds. Written as config.json beside outputs.
json resolved_config(const Command& cmd, const po::variables_map& vm);
json config_json(const Config& cfg);

// A comma-separated option value ("8192,16384") as a list; `what` names the option in errors.
template <class T>
std::vector<T> parse_list(const std::string& s, const char* what) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    std::istringstream is(item);
    T v;
    if (!(is >> v) || !is.eof()) throw ConfigError(cat(what, ": '", item, "' in '", s, "' is not a valid value"));
    out.push_back(v);
  }
  if (out.empty()) throw ConfigError(cat(what, ": empty list"));
  return out;
}

// A number for a CSV cell: 10 significant digits, "nan" for NaN (what pandas reads back).
std::string csv_num(double x);
// A number for JSON: NaN becomes null (JSON has no NaN).
json json_num(double x);

// Reshapes a packed per-token output [N, ...] back to [B, T, ...] when the input was a batch.
template <class T>
Tensor<T> unpack(const Tensor<T>& t, int64_t batch);

// ---- Shared by `forward` and `decode`, which write the same files ----
// Adds forward's per-position outputs (docs/interface.md) to `out`, unpacked to [B, T, ...] for a batch.
template <class S>
void write_forward(const Workload& w, const ref::ForwardResult<S>& r, OutputDir& out);
ref::Path parse_path(const po::variables_map& vm);  // --path
bool use_double(const po::variables_map& vm);       // --precision
json workload_json(const Workload& w);              // N, batch, seqlens, shared_kv
// Refuses (Error, naming the first) a NaN or Inf output computed from finite inputs: the
// arithmetic overflowed. lse = -inf (a branch that sees nothing) is a value. Skip it with
// --allow-nonfinite.
template <class S>
void check_finite_outputs(const ref::ForwardResult<S>& r, int64_t batch, bool dbl);

}  // namespace nsa::cli
