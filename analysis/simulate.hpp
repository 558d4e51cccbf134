// A trace-driven memory simulator for NSA's kernels (docs/simulate.md): replays a selection
// (block_idx) through a model of a kernel's schedule (which tile loads which rows, in which order,
// how many CTAs run at once) and of the GPU's L2 (set-associative, sectored, LRU/FIFO/random), and
// reports the bytes each branch reads from L2 and from HBM, reuse-distance histograms and the time
// the traffic implies at a device's ceilings. Eigen-free.
//
// What the formula of analysis/traffic.hpp leaves out and this models: neighbouring positions and
// the G heads of a group sharing a block (within a tile: read once; across tiles: an L2 hit if it
// is still there), the order in which tiles run, and what the L2 keeps.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "config.hpp"
#include "tensor.hpp"

namespace nsa::analysis {

// ---------------------------------------------------------------- the cache

enum class CachePolicy { Lru, Fifo, Random };
const char* to_string(CachePolicy p);
CachePolicy parse_cache_policy(const std::string& s);  // "lru", "fifo", "random"

// A set-associative, sectored cache. Lines have a tag and one valid bit per sector: a read of
// sectors missing from a present line fetches only those (NVIDIA's L2 fills by 32-byte sector).
// Writes allocate without fetching (the kernels write whole sectors) and are written back when
// their line is evicted.
struct CacheSpec {
  std::string name = "custom";
  int64_t size_bytes = 0;
  int64_t line_bytes = 128;
  int64_t sector_bytes = 32;
  int64_t ways = 16;
  CachePolicy policy = CachePolicy::Lru;
  // true: the set of a line is a hash of its address (GPUs hash L2 slices and sets, so strided rows
  // spread evenly); false: line % sets (hand-computed tests).
  bool hashed_index = true;
  int64_t sets() const { return size_bytes / (line_bytes * ways); }  // the capacity used: sets * ways lines
  void validate() const;  // ConfigError naming the field
};

// Counts of one cache: sectors asked for and sectors missed (read misses are fetched from memory),
// dirty sectors written back on eviction.
struct CacheCounts {
  int64_t read_sectors = 0, read_miss_sectors = 0;
  int64_t write_sectors = 0, writeback_sectors = 0;
};

class Cache {
 public:
  // sample = K >= 1: only the sets s with s % K == 0 are simulated (set sampling); accesses to
  // other sets return at once and are not counted. K = 1 simulates every set.
  explicit Cache(const CacheSpec& spec, int64_t sample = 1, uint64_t seed = 0);
  // The set of a line (index function of the spec) and whether it is simulated.
  int64_t set_of(uint64_t line) const { return set_from_hash(line, line_hash(line)); }
  bool simulated(uint64_t line) const { return sampled_set(set_of(line)); }
  // Reads or writes the sectors `mask` (bit i: sector i of the line) of `line`; returns the sectors
  // that missed (reads: fetched from memory; writes: allocated). Not-simulated lines: 0, uncounted.
  int access(uint64_t line, uint32_t mask, bool write) {
    const int64_t set = set_of(line);
    return sampled_set(set) ? access_in_set(set, line, mask, write) : 0;
  }
  // The same in pieces, for the replay's inner loop: the line's hash (shared with ReuseTracker),
  // its set, whether the set is simulated, the access.
  static uint64_t line_hash(uint64_t line);
  int64_t set_from_hash(uint64_t line, uint64_t h) const {
    // Lemire's multiply-shift range reduction of the hash's high half: no division per line.
    return spec_.hashed_index ? int64_t(((h >> 32) * uint64_t(sets_)) >> 32) : int64_t(line % uint64_t(sets_));
  }
  bool sampled_set(int64_t set) const { return sample_pow2_ ? (set & (sample_ - 1)) == 0 : set % sample_ == 0; }
  int access_in_set(int64_t set, uint64_t line, uint32_t mask, bool write);
  // The lines of the set holding `line`, most recently used first (LRU) / newest first (FIFO).
  std::vector<uint64_t> set_contents(uint64_t line) const;
  const CacheCounts& counts() const { return counts_; }
  // Per simulated set: the read sectors it missed (for the sampling error).
  const std::vector<int64_t>& set_misses() const { return set_misses_; }
  int64_t sample() const { return sample_; }
  const CacheSpec& spec() const { return spec_; }

 private:
  struct Way {
    uint64_t tag = ~uint64_t(0);  // the line; all ones: empty
    uint64_t stamp = 0;           // last use (LRU) or fill (FIFO)
    uint32_t valid = 0, dirty = 0;
  };
  CacheSpec spec_;
  int64_t sets_, sample_, sectors_per_line_;
  bool sample_pow2_;
  std::vector<Way> ways_;  // [simulated sets, ways]
  std::vector<int64_t> set_misses_;
  uint64_t clock_ = 0, rng_;
  CacheCounts counts_;
};

// Reuse distances (LRU stack distances): for each access, the number of distinct lines touched
// since the previous access to the same line (first accesses are "cold"). A fully associative LRU
// cache of C lines hits exactly the accesses with distance < C. With sample R > 1, only lines whose
// hash falls in 1/R of the hash space are tracked and distances are scaled by R (spatial sampling,
// as SHARDS does): an unbiased estimate whose error shrinks with the number of tracked lines.
class ReuseTracker {
 public:
  explicit ReuseTracker(int64_t sample = 1);
  bool tracked(uint64_t line) const { return tracked_hash(Cache::line_hash(line)); }
  // The low bits of the line's hash (the cache's set uses the high half).
  bool tracked_hash(uint64_t h) const { return pow2_ ? (h & uint64_t(sample_ - 1)) == 0 : h % uint64_t(sample_) == 0; }
  // Records an access; returns the (scaled) distance in lines, or -1 for a cold access.
  // Untracked lines: returns -2 and records nothing.
  int64_t access(uint64_t line) { return tracked(line) ? record(line) : -2; }
  // Records an access of a line known to be tracked.
  int64_t record(uint64_t line);
  int64_t sample() const { return sample_; }

 private:
  void compact();
  void fen_add(int64_t i, int64_t v);
  int64_t fen_sum(int64_t i) const;  // marks in [0, i]
  int64_t sample_, now_ = 0;
  bool pow2_;
  std::vector<int64_t> fen_;
  struct Map;
  std::shared_ptr<Map> last_;
};

// A histogram of reuse distances in bytes (distance x line bytes), bins [0, 2^10), then powers of
// two up to 2^40, and "cold".
struct ReuseHistogram {
  static constexpr int kBins = 32;           // bin 0: [0, 1 KiB); bin i: [2^(9+i), 2^(10+i)); last: >= 2^40
  std::vector<double> count = std::vector<double>(kBins, 0.0);  // accesses (scaled by the sample)
  double cold = 0;
  void add(int64_t distance_bytes, double weight);
  static double bin_lo(int i);
  static double bin_hi(int i);  // +inf for the last
};

// ---------------------------------------------------------------- devices and schedules

// A GPU for the simulation: its L2, SM count, shared memory per SM, and the ceilings the time
// prediction divides by (bytes/s of HBM traffic as a device copy achieves, of L2 reads, and the
// dense 16-bit matrix rate). A ceiling of 0 is unknown and left out of the prediction.
struct GpuSpec {
  std::string name;
  CacheSpec l2;
  int64_t sms = 0;
  int64_t smem_per_sm = 0;     // bytes a CTA may use in all on one SM
  int64_t smem_reserved = 0;   // bytes the runtime reserves per CTA
  double copy_bytes_per_s = 0, l2_bytes_per_s = 0, matrix_flops_per_s = 0;
  std::string source;          // where the numbers come from
};
// h200, h100, a100, b200 (docs/simulate.md gives each number's source); throws ConfigError.
GpuSpec gpu_preset(const std::string& name);
std::vector<std::string> gpu_presets();

enum class ScheduleKind { QueryCentric, BlockCentric };
enum class TileOrder { GroupMajor, PositionMajor };
const char* to_string(ScheduleKind k);
const char* to_string(TileOrder o);
ScheduleKind parse_schedule(const std::string& s);  // "query", "block"
TileOrder parse_tile_order(const std::string& s);   // "group", "position"

// The selection kernel's schedule.
//   query-centric (today's slc_attn, kernels v1/v3/v4): a tile (one warp) holds tile_heads heads
//     of one group for tile_positions consecutive positions, walks the union of their block lists
//     in ascending order and loads each block's K and V rows u < j*l' + l' and u <= the tile's last
//     position, chunk_rows rows per step, once for the whole tile. tiles_per_cta tiles per CTA, CTAs
//     launched in order (order: group-major = all tiles of KV head 0 first, as the kernel does),
//     ctas_per_sm x sms resident at once; a CTA's slot goes to the next CTA when all its tiles end.
//     cta_union: the CTA's tiles share one union (shared-memory reuse inside a CTA).
//   block-centric: a CTA per (group, block j, up to block_positions of the positions that selected
//     j, ascending): loads block j's rows once, then per position reads its G query heads and
//     writes a partial output (fp32 o and log-sum-exp per head); a second kernel reads each
//     position's n partials and writes o. Order: group, then block.
struct Schedule {
  ScheduleKind kind = ScheduleKind::QueryCentric;
  TileOrder order = TileOrder::GroupMajor;
  int64_t tile_positions = 0;  // 0: 16 / G (the kernel's 16 rows per warp; 1 when G >= 16)
  int64_t tile_heads = 0;      // 0: G (group-centric); < G: per-head tiles, each loads the blocks
  int64_t tiles_per_cta = 2;   // warps per CTA of the selection kernel (v3/v4: 2)
  int64_t ctas_per_sm = 0;     // 0: as many as the kernel's shared memory allows (kernel_ctas_per_sm)
  int64_t sms = 0;             // 0: the GPU's
  int64_t chunk_rows = 32;     // rows per pipeline stage
  bool cta_union = false;
  int64_t block_positions = 64;  // block-centric: positions per CTA
};

// CTAs per SM of today's selection kernel (v3/v4, select.cu): its shared memory per warp is two
// stages of chunk_rows K and V rows plus 16 block lists of n ints; CTAs of tiles_per_cta warps fit
// (smem_per_sm) / (per CTA + reserved), at most 32.
int64_t kernel_ctas_per_sm(const Config& cfg, const Schedule& s, const GpuSpec& gpu, int dtype_bytes);

// ---------------------------------------------------------------- selections

// A selection: block_idx [N, Hkv, n] (ascending, -1 padding) over packed sequences.
struct Selection {
  Tensor<int32_t> block_idx;
  std::vector<int64_t> cu_seqlens;  // [B+1]
};
// Checks a block_idx against the config and packing: shape, every entry -1 or a valid block
// (0 <= j <= t / l'), ascending, -1 only at the end. Throws InputError naming `what` and the place.
void check_selection(const Config& cfg, const Selection& sel, const std::string& what);

// Synthetic selections with the config's n, l', forced blocks (the first init_blocks and the
// local_blocks ending at t's block), the rest drawn per (position, group) from one seeded stream:
//   random     a uniform random subset of the other valid blocks (what NSA picks on N(0, 1) inputs);
//   clustered  position t keeps each of position t-1's other blocks with probability
//              exp(-1 / corr_len) (if still not forced), draws the rest uniformly: runs of about
//              corr_len positions share blocks, as real attention's vertical stripes do;
//   recent     the most recent other valid blocks (a sliding window of about n*l' tokens).
struct SelectionSpec {
  std::string kind = "random";
  int64_t T = 1024, B = 1, Hkv = 1;
  uint64_t seed = 0;
  double corr_len = 64;
};
Selection draw_selection(const Config& cfg, const SelectionSpec& spec);
std::vector<std::string> selection_kinds();

// ---------------------------------------------------------------- the simulation

enum class Branch { Cmp, Slc, Win };
const char* to_string(Branch b);
// The tensors a branch's streams touch.
enum class Stream { Q, K, V, Idx, O, Lse, Partial, Gates, Kc, Vc };
const char* to_string(Stream s);
constexpr int kStreams = 10;

struct StreamTraffic {
  double l2_read_bytes = 0, l2_write_bytes = 0;  // asked of L2 (whole sectors)
  double hbm_read_bytes = 0;                     // read misses (estimated when sampled)
};

struct BranchResult {
  Branch branch = Branch::Slc;
  StreamTraffic streams[kStreams];
  double l2_read_bytes = 0, l2_write_bytes = 0, hbm_read_bytes = 0, hbm_write_bytes = 0;
  double hbm_read_stderr = 0;  // standard error of hbm_read_bytes from set sampling (0: exact)
  double sector_read_hit_rate = 0;
  double useful_flops = 0;     // 2 (dk + dv) per visited key and query head (analysis/cost.hpp)
  double executed_flops = 0;   // what the tiles compute: masked rows and keys included
  double formula_bytes = 0;    // analysis::prefill_traffic's bytes of this branch (no reuse modelled)
  int64_t kv_block_loads = 0;  // (group, block) loads of K and V rows by tiles/CTAs
  int64_t ctas = 0, tiles = 0, ctas_resident = 0;
  // Time at the GPU's ceilings, ms: HBM bytes (read + write) / copy rate, L2 bytes / L2 rate,
  // executed FLOPs / matrix rate; predicted = their maximum (0 where the ceiling is unknown).
  double ms_hbm = 0, ms_l2 = 0, ms_matrix = 0, predicted_ms = 0;
  std::string bound;  // "hbm", "l2" or "matrix"
  ReuseHistogram reuse;  // of the branch's reads
};

struct SimOptions {
  GpuSpec gpu;
  Schedule schedule;
  std::vector<Branch> branches = {Branch::Slc};
  int dtype_bytes = 2;
  int64_t sample = 1;         // set sampling of the L2 (1: every set); 0: automatic
  int64_t reuse_sample = 0;   // line sampling of the reuse distances; 0: automatic; -1: none
  uint64_t seed = 0;          // the random policy's stream
  // Called now and then with the fraction of the work done (terminal progress).
  std::function<void(double)> progress;
};

struct SimResult {
  std::vector<BranchResult> branches;
  int64_t sample = 1, reuse_sample = 1;
  int64_t ctas_per_sm = 0;
  double seconds = 0;
};

// Throws ConfigError naming the first bad field of the options (schedule, L2, dtype).
void check_options(const SimOptions& opt);

// Replays the selection through each asked branch's schedule, each branch from a cold L2 (every
// kernel is measured alone, as Nsight Compute does with its cache control). Throws ConfigError or
// InputError (check_selection) naming the problem.
SimResult simulate(const Config& cfg, const Selection& sel, const SimOptions& opt);

// ---- the pieces, for tests and for other schedules ----

// One memory access of a kernel: `bytes` bytes at `addr`, of stream `s`.
struct Access {
  uint64_t addr = 0;
  int64_t bytes = 0;
  Stream stream = Stream::K;
  bool write = false;
};
// The memory model alone: a Cache, a ReuseTracker and per-stream counts, fed accesses in order.
class MemoryModel {
 public:
  MemoryModel(const CacheSpec& l2, int64_t sample, int64_t reuse_sample, uint64_t seed = 0);
  void access(uint64_t addr, int64_t bytes, Stream s, bool write);
  void access(const Access& a) { access(a.addr, a.bytes, a.stream, a.write); }
  // Per-stream traffic and the branch totals (sampled counts scaled), written into r.
  void finish(BranchResult& r) const;
  const Cache& cache() const { return cache_; }

 private:
  Cache cache_;
  ReuseTracker reuse_;
  bool track_reuse_;
  int64_t read_sectors_[kStreams] = {}, write_sectors_[kStreams] = {}, miss_sectors_[kStreams] = {};
  ReuseHistogram hist_;
};

}  // namespace nsa::analysis
