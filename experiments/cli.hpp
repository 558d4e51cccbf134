// The `nsa` command's shared machinery (INTERFACE.md): option groups, INI config files, the
// resolved-config JSON, loading a workload into reference inputs, and all-or-nothing output.
// Each subcommand lives in its own cmd_<name>.cpp and registers in main.cpp.
#pragma once

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config.hpp"
#include "nsa_ref.hpp"

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

// ---- Option groups shared by the subcommands (INTERFACE.md, "Common options") ----
po::options_description input_options();    // --q --k --v, per-branch K/V, gates, --cu-seqlens
po::options_description nsa_options();      // l, d, l', n, w, forced blocks, phi, scale
po::options_description run_options();      // --precision, --dtype, --device, --threads, --path, ...
po::options_description output_options();   // --out

// The Config from the options and the tensors' shapes (Hq, dk from q; Hkv from k; dv from v).
// Validated; errors name the option.
Config make_config(const po::variables_map& vm, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv);
// The NSA block settings alone (no head counts), validated with placeholder heads.
Config block_config(const po::variables_map& vm);

// A workload loaded from the files named by the options: tensors in double, packed to [N, H, D]
// (a [B, T, H, D] batch becomes B sequences of T), checked against the config; errors name the
// file. `batch` is B for a rank-4 batch and 0 for packed/single sequences.
struct Workload {
  Config cfg;
  ref::Inputs<double> in;
  int64_t batch = 0;
  std::vector<int64_t> seqlens;  // per sequence
};
// With nsa = false (full attention) only the head layout and --scale are read.
Workload load_workload(const po::variables_map& vm, bool nsa = true);

// --path (fast or oracle) and --precision (true for double), checked.
ref::Path parse_path(const po::variables_map& vm);
bool use_double(const po::variables_map& vm);
// The workload's shape for config.json: N, batch, sequence lengths, shared k/v.
json workload_json(const Workload& w);

// Files of an output folder that appear all together or not at all: each is written to a
// temporary name as it is added, and `commit()` renames them all into place (and writes
// config.json). If the command fails before commit, the destructor removes the temporaries.
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
  std::vector<std::pair<std::string, std::string>> staged_;  // temporary path, final path
  bool committed_ = false;
};

// The resolved configuration: every option's value (given, from --config, or default), plus the
// derived quantities the caller adds. Written as config.json beside outputs.
json resolved_config(const Command& cmd, const po::variables_map& vm);
json config_json(const Config& cfg);

// Reshapes a packed per-token output [N, ...] back to [B, T, ...] when the input was a batch.
template <class T>
Tensor<T> unpack(const Tensor<T>& t, int64_t batch);

// ---- Shared by `forward` and `decode`, which write the same files ----
// Adds forward's per-position outputs (INTERFACE.md) to `out`, unpacked to [B, T, ...] for a batch.
template <class S>
void write_forward(const Workload& w, const ref::ForwardResult<S>& r, OutputDir& out);

// The machine's free memory in bytes (MemAvailable), for refusing oversized requests early.
double available_memory_bytes();
// Throws ResourceError naming `what` and the bytes needed when they exceed what is free.
void require_memory(double bytes, const std::string& what);

}  // namespace nsa::cli
