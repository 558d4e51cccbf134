// The trace-driven memory simulator (simulate.hpp, docs/simulate.md).
#include "simulate.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <unordered_map>

#include "cost.hpp"
#include "errors.hpp"
#include "rng.hpp"
#include "traffic.hpp"

namespace nsa::analysis {

namespace {

// splitmix64's finaliser: a bijective mix, so hashed sets and sampled lines are uniform over
// strided address patterns (rows of one KV head are Hkv rows apart).
inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

}  // namespace

// ================================================================ names

const char* to_string(CachePolicy p) {
  return p == CachePolicy::Lru ? "lru" : p == CachePolicy::Fifo ? "fifo" : "random";
}
CachePolicy parse_cache_policy(const std::string& s) {
  if (s == "lru") return CachePolicy::Lru;
  if (s == "fifo") return CachePolicy::Fifo;
  if (s == "random") return CachePolicy::Random;
  throw ConfigError(cat("cache policy = '", s, "' is not one of: lru, fifo, random"));
}
const char* to_string(ScheduleKind k) { return k == ScheduleKind::QueryCentric ? "query" : "block"; }
const char* to_string(TileOrder o) { return o == TileOrder::GroupMajor ? "group" : "position"; }
ScheduleKind parse_schedule(const std::string& s) {
  if (s == "query") return ScheduleKind::QueryCentric;
  if (s == "block") return ScheduleKind::BlockCentric;
  throw ConfigError(cat("schedule = '", s, "' is not one of: query, block"));
}
TileOrder parse_tile_order(const std::string& s) {
  if (s == "group") return TileOrder::GroupMajor;
  if (s == "position") return TileOrder::PositionMajor;
  throw ConfigError(cat("tile order = '", s, "' is not one of: group, position"));
}
const char* to_string(Branch b) { return b == Branch::Cmp ? "cmp" : b == Branch::Slc ? "slc" : "win"; }
const char* to_string(Stream s) {
  static const char* names[kStreams] = {"q", "k", "v", "idx", "o", "lse", "partial", "gates", "kc", "vc"};
  return names[int(s)];
}

// ================================================================ the cache

void CacheSpec::validate() const {
  auto pow2 = [](int64_t x) { return x > 0 && (x & (x - 1)) == 0; };
  if (!pow2(sector_bytes)) throw ConfigError(cat("cache sector size = ", sector_bytes, " B: expected a power of two"));
  if (!pow2(line_bytes) || line_bytes < sector_bytes || line_bytes / sector_bytes > 32)
    throw ConfigError(cat("cache line size = ", line_bytes, " B: expected a power of two, from the sector size (",
                          sector_bytes, " B) to 32 sectors"));
  if (ways < 1) throw ConfigError(cat("cache ways = ", ways, ": expected >= 1"));
  if (size_bytes < line_bytes * ways)
    throw ConfigError(cat("cache size = ", size_bytes, " B: expected at least one set of ", ways, " lines of ",
                          line_bytes, " B"));
}

Cache::Cache(const CacheSpec& spec, int64_t sample, uint64_t seed)
    : spec_(spec), sets_(spec.sets()), sample_(sample), sectors_per_line_(spec.line_bytes / spec.sector_bytes),
      sample_pow2_(sample > 0 && (sample & (sample - 1)) == 0), rng_(mix(seed + 1)) {
  spec_.validate();
  if (sample < 1 || sample > sets_)
    throw ConfigError(cat("cache sample = ", sample, ": expected 1 to the number of sets (", sets_, ")"));
  const int64_t simulated = (sets_ + sample - 1) / sample;
  ways_.assign(size_t(simulated * spec.ways), Way{});
  set_misses_.assign(size_t(simulated), 0);
}

uint64_t Cache::line_hash(uint64_t line) { return mix(line); }

int Cache::access_in_set(int64_t set, uint64_t line, uint32_t mask, bool write) {
  const int64_t si = set / sample_;
  Way* w = &ways_[size_t(si * spec_.ways)];
  const int W = int(spec_.ways);
  const int n = __builtin_popcount(mask);
  ++clock_;
  for (int i = 0; i < W; ++i) {
    if (w[i].tag != line) continue;
    const int miss = __builtin_popcount(mask & ~w[i].valid);
    w[i].valid |= mask;
    if (write) {
      w[i].dirty |= mask;
      counts_.write_sectors += n;
    } else {
      counts_.read_sectors += n;
      counts_.read_miss_sectors += miss;
      set_misses_[size_t(si)] += miss;
    }
    if (spec_.policy == CachePolicy::Lru) w[i].stamp = clock_;
    return miss;
  }
  // A miss: an empty way if any, else the policy's victim.
  int v = -1;
  for (int i = 0; i < W && v < 0; ++i)
    if (w[i].tag == ~uint64_t(0)) v = i;
  if (v < 0) {
    if (spec_.policy == CachePolicy::Random) {
      rng_ = mix(rng_);
      v = int(rng_ % uint64_t(W));
    } else {
      v = 0;
      for (int i = 1; i < W; ++i)
        if (w[i].stamp < w[v].stamp) v = i;
    }
    counts_.writeback_sectors += __builtin_popcount(w[v].dirty);
  }
  w[v] = Way{line, clock_, mask, write ? mask : 0u};
  if (write) {
    counts_.write_sectors += n;
  } else {
    counts_.read_sectors += n;
    counts_.read_miss_sectors += n;
    set_misses_[size_t(si)] += n;
  }
  return n;
}

std::vector<uint64_t> Cache::set_contents(uint64_t line) const {
  const int64_t set = set_of(line);
  std::vector<uint64_t> out;
  if (set % sample_) return out;
  const Way* w = &ways_[size_t(set / sample_ * spec_.ways)];
  std::vector<Way> v(w, w + spec_.ways);
  std::sort(v.begin(), v.end(), [](const Way& a, const Way& b) { return a.stamp > b.stamp; });
  for (const Way& x : v)
    if (x.tag != ~uint64_t(0)) out.push_back(x.tag);
  return out;
}

// ================================================================ reuse distances

struct ReuseTracker::Map {
  std::unordered_map<uint64_t, int64_t> last;  // line -> time of its latest access
};

ReuseTracker::ReuseTracker(int64_t sample)
    : sample_(sample), pow2_(sample > 0 && (sample & (sample - 1)) == 0), last_(std::make_shared<Map>()) {
  if (sample < 1) throw ConfigError(cat("reuse-distance sample = ", sample, ": expected >= 1"));
  fen_.assign(1 << 16, 0);
}

void ReuseTracker::fen_add(int64_t i, int64_t v) {
  for (++i; i <= int64_t(fen_.size()); i += i & -i) fen_[size_t(i - 1)] += v;
}

int64_t ReuseTracker::fen_sum(int64_t i) const {
  int64_t s = 0;
  for (++i; i > 0; i -= i & -i) s += fen_[size_t(i - 1)];
  return s;
}

// Times of dead accesses are dropped: the live lines keep their order and get times 0..D-1.
void ReuseTracker::compact() {
  std::vector<std::pair<int64_t, uint64_t>> live;
  live.reserve(last_->last.size());
  for (const auto& [line, t] : last_->last) live.emplace_back(t, line);
  std::sort(live.begin(), live.end());
  const size_t cap = std::max<size_t>(size_t(1) << 16, 2 * live.size() + 1024);
  fen_.assign(cap, 0);
  for (size_t i = 0; i < live.size(); ++i) {
    last_->last[live[i].second] = int64_t(i);
    fen_add(int64_t(i), 1);
  }
  now_ = int64_t(live.size());
}

int64_t ReuseTracker::record(uint64_t line) {
  if (now_ == int64_t(fen_.size())) compact();
  auto [it, fresh] = last_->last.try_emplace(line, now_);
  int64_t d = -1;
  if (!fresh) {
    const int64_t prev = it->second;
    d = (fen_sum(now_ - 1) - fen_sum(prev)) * sample_;  // distinct tracked lines since, scaled
    fen_add(prev, -1);
    it->second = now_;
  }
  fen_add(now_, 1);
  ++now_;
  return d;
}

void ReuseHistogram::add(int64_t distance_bytes, double weight) {
  if (distance_bytes < 0) {
    cold += weight;
    return;
  }
  int b = 0;
  if (distance_bytes >= 1024) b = std::min(kBins - 1, (64 - __builtin_clzll(uint64_t(distance_bytes))) - 10);
  count[size_t(b)] += weight;
}
double ReuseHistogram::bin_lo(int i) { return i == 0 ? 0.0 : std::ldexp(1.0, 9 + i); }
double ReuseHistogram::bin_hi(int i) {
  return i == kBins - 1 ? std::numeric_limits<double>::infinity() : std::ldexp(1.0, 10 + i);
}

// ================================================================ the memory model

MemoryModel::MemoryModel(const CacheSpec& l2, int64_t sample, int64_t reuse_sample, uint64_t seed)
    : cache_(l2, sample, seed), reuse_(reuse_sample > 0 ? reuse_sample : 1), track_reuse_(reuse_sample > 0) {}

void MemoryModel::access(uint64_t addr, int64_t bytes, Stream s, bool write) {
  if (bytes <= 0) return;
  const uint64_t L = uint64_t(cache_.spec().line_bytes), S = uint64_t(cache_.spec().sector_bytes);
  const uint64_t end = addr + uint64_t(bytes);
  const int si = int(s);
  for (uint64_t line = addr / L; line * L < end; ++line) {
    const uint64_t lo = std::max(addr, line * L) - line * L, hi = std::min(end, (line + 1) * L) - line * L;
    const uint32_t first = uint32_t(lo / S), last = uint32_t((hi - 1) / S);
    const uint32_t mask = uint32_t(((uint64_t(1) << (last + 1)) - 1) & ~((uint64_t(1) << first) - 1));
    const int n = int(last - first + 1);
    if (write)
      write_sectors_[si] += n;
    else
      read_sectors_[si] += n;
    const uint64_t h = Cache::line_hash(line);
    const int64_t set = cache_.set_from_hash(line, h);
    if (cache_.sampled_set(set)) {
      const int miss = cache_.access_in_set(set, line, mask, write);
      if (!write) miss_sectors_[si] += miss;
    }
    if (track_reuse_ && reuse_.tracked_hash(h)) {
      const int64_t d = reuse_.record(line);
      if (!write) hist_.add(d < 0 ? -1 : d * int64_t(L), double(reuse_.sample()));
    }
  }
}

void MemoryModel::finish(BranchResult& r) const {
  const CacheSpec& sp = cache_.spec();
  const double S = double(sp.sector_bytes);
  const std::vector<int64_t>& per_set = cache_.set_misses();
  const double sets = double(sp.sets()), k = double(per_set.size());
  const double scale = sets / k;  // simulated sets stand for all
  double rd = 0, wr = 0, miss = 0;
  for (int s = 0; s < kStreams; ++s) {
    r.streams[s].l2_read_bytes = double(read_sectors_[s]) * S;
    r.streams[s].l2_write_bytes = double(write_sectors_[s]) * S;
    r.streams[s].hbm_read_bytes = double(miss_sectors_[s]) * scale * S;
    rd += r.streams[s].l2_read_bytes, wr += r.streams[s].l2_write_bytes, miss += r.streams[s].hbm_read_bytes;
  }
  r.l2_read_bytes = rd, r.l2_write_bytes = wr, r.hbm_read_bytes = miss;
  r.hbm_write_bytes = double(cache_.counts().writeback_sectors) * scale * S;
  r.sector_read_hit_rate = rd > 0 ? 1.0 - miss / rd : 0.0;
  // Standard error of the total from k sampled sets of `sets` (finite-population correction).
  r.hbm_read_stderr = 0;
  if (k < sets && k > 1) {
    double mean = 0, var = 0;
    for (int64_t m : per_set) mean += double(m);
    mean /= k;
    for (int64_t m : per_set) var += (double(m) - mean) * (double(m) - mean);
    var /= (k - 1);
    r.hbm_read_stderr = sets * std::sqrt(var / k * (1.0 - k / sets)) * S;
  }
  r.reuse = hist_;
}

// ================================================================ devices

std::vector<std::string> gpu_presets() { return {"h200", "h100", "a100", "b200"}; }

GpuSpec gpu_preset(const std::string& name) {
  GpuSpec g;
  g.name = name;
  g.l2.name = name;
  g.l2.line_bytes = 128, g.l2.sector_bytes = 32, g.l2.ways = 16;
  g.smem_reserved = 1024;
  const int64_t MiB = int64_t(1) << 20;
  if (name == "h200") {
    g.l2.size_bytes = 60 * MiB, g.sms = 132, g.smem_per_sm = 233472;
    g.copy_bytes_per_s = 3.9e12, g.l2_bytes_per_s = 16e12, g.matrix_flops_per_s = 781e12;
    g.source = "H200 SXM: GH100 with 132 SMs and all six HBM3e stacks, so all 12 memory controllers and the "
               "L2 slices behind them: 60 MB (the H100 SXM enables 5 stacks and 50 MB); ceilings measured on "
               "our H200 (NSA-SPEC.md 10: copy 3.9 TB/s, L2 reads 16 TB/s, bf16 matrix 781 TFLOP/s)";
  } else if (name == "h100") {
    g.l2.size_bytes = 50 * MiB, g.sms = 132, g.smem_per_sm = 233472;
    g.copy_bytes_per_s = 2.8e12, g.l2_bytes_per_s = 14.0e12, g.matrix_flops_per_s = 760e12;
    g.source = "H100 SXM5 80GB: 50 MB L2, 132 SMs (NVIDIA H100 whitepaper); ceilings measured on our H100 "
               "(docs/cuda.md: copy 2.8 TB/s, L2 reads 14.0 TB/s, bf16 matrix 758-762 TFLOP/s)";
  } else if (name == "a100") {
    g.l2.size_bytes = 40 * MiB, g.sms = 108, g.smem_per_sm = 167936;
    g.copy_bytes_per_s = 2.039e12, g.l2_bytes_per_s = 0, g.matrix_flops_per_s = 312e12;
    g.source = "A100 SXM4 80GB data sheet: 40 MB L2, 108 SMs, 2.039 TB/s, 312 TFLOP/s bf16 dense; L2 read rate not "
               "measured (left out of the prediction)";
  } else if (name == "b200") {
    g.l2.size_bytes = 126 * MiB, g.sms = 148, g.smem_per_sm = 233472;
    g.copy_bytes_per_s = 8.0e12, g.l2_bytes_per_s = 0, g.matrix_flops_per_s = 2.25e15;
    g.source = "B200 (HGX B200): 148 SMs, 8 TB/s HBM3e, 2.25 PFLOP/s bf16 dense from NVIDIA's data sheet; L2 126 MB "
               "as published microbenchmarks report (not in the data sheet: check cudaDeviceProp::l2CacheSize); "
               "L2 read rate not measured";
  } else {
    throw ConfigError(cat("gpu '", name, "' is not one of: h200, h100, a100, b200"));
  }
  return g;
}

int64_t kernel_ctas_per_sm(const Config& c, const Schedule& s, const GpuSpec& gpu, int dtype_bytes) {
  const int64_t per_warp = 2 * s.chunk_rows * (c.dk + c.dv) * dtype_bytes + 16 * c.slc_count * 4;
  const int64_t per_cta = s.tiles_per_cta * per_warp + gpu.smem_reserved;
  const int64_t fit = gpu.smem_per_sm / per_cta;
  if (fit < 1)
    throw ConfigError(cat("the selection kernel's CTA needs ", per_cta, " B of shared memory, more than the ",
                          gpu.smem_per_sm, " B of an SM of ", gpu.name));
  return std::min<int64_t>({fit, 32, std::max<int64_t>(1, 64 / s.tiles_per_cta)});
}

// ================================================================ selections

std::vector<std::string> selection_kinds() { return {"random", "clustered", "recent"}; }

void check_selection(const Config& c, const Selection& sel, const std::string& what) {
  const Shape& sh = sel.block_idx.shape();
  if (sel.cu_seqlens.size() < 2 || sel.cu_seqlens.front() != 0)
    throw InputError(cat(what, ": the sequence offsets must start at 0 and hold at least one sequence"));
  const int64_t N = sel.cu_seqlens.back();
  if (sh.size() != 3 || sh[0] != N || sh[1] != c.Hkv || sh[2] != c.slc_count)
    throw InputError(cat(what, ": shape ", shape_str(sh), " is not [N, Hkv, n] = [", N, ", ", c.Hkv, ", ",
                         c.slc_count, "]"));
  const int32_t* p = sel.block_idx.data();
  for (size_t b = 0; b + 1 < sel.cu_seqlens.size(); ++b) {
    if (sel.cu_seqlens[b + 1] < sel.cu_seqlens[b]) throw InputError(cat(what, ": sequence offsets decrease"));
    for (int64_t r = sel.cu_seqlens[b]; r < sel.cu_seqlens[b + 1]; ++r) {
      const int64_t t = r - sel.cu_seqlens[b];
      for (int64_t g = 0; g < c.Hkv; ++g) {
        const int32_t* l = p + (r * c.Hkv + g) * c.slc_count;
        bool pad = false;
        for (int64_t m = 0; m < c.slc_count; ++m) {
          const int32_t j = l[m];
          const std::string at = cat(what, ": entry [", r, ", ", g, ", ", m, "] (position ", t, " of sequence ", b,
                                     ") = ", j);
          if (j == -1) {
            pad = true;
            continue;
          }
          if (pad) throw InputError(cat(at, " follows a -1: padding must come last"));
          if (j < 0 || j > t / c.slc_len)
            throw InputError(cat(at, " is not a valid block: expected -1 or 0 <= j <= t / l' = ", t / c.slc_len));
          if (m > 0 && j <= l[m - 1]) throw InputError(cat(at, ": blocks must be strictly ascending"));
        }
      }
    }
  }
}

Selection draw_selection(const Config& c, const SelectionSpec& sp) {
  const auto kinds = selection_kinds();
  if (std::find(kinds.begin(), kinds.end(), sp.kind) == kinds.end())
    throw ConfigError(cat("selection = '", sp.kind, "' is not one of: random, clustered, recent"));
  if (sp.T < 1) throw ConfigError(cat("T = ", sp.T, " is invalid: expected >= 1"));
  if (sp.B < 1) throw ConfigError(cat("B = ", sp.B, " is invalid: expected >= 1"));
  if (sp.Hkv < 1) throw ConfigError(cat("Hkv = ", sp.Hkv, " is invalid: expected >= 1"));
  if (sp.kind == "clustered" && !(sp.corr_len > 0 && std::isfinite(sp.corr_len)))
    throw ConfigError(cat("corr_len = ", sp.corr_len, " is invalid: expected a finite number of positions > 0"));
  const int64_t n = c.slc_count, ls = c.slc_len;
  Selection s;
  s.cu_seqlens.push_back(0);
  for (int64_t b = 0; b < sp.B; ++b) s.cu_seqlens.push_back(s.cu_seqlens.back() + sp.T);
  s.block_idx = Tensor<int32_t>({sp.B * sp.T, sp.Hkv, n}, int32_t(-1));
  const double keep = sp.kind == "clustered" ? std::exp(-1.0 / sp.corr_len) : 0.0;
  Rng rng(sp.seed);
  std::vector<int32_t> prev, cur, pool;
  for (int64_t b = 0; b < sp.B; ++b)
    for (int64_t g = 0; g < sp.Hkv; ++g) {
      prev.clear();
      for (int64_t t = 0; t < sp.T; ++t) {
        int32_t* out = s.block_idx.data() + ((b * sp.T + t) * sp.Hkv + g) * n;
        const int64_t valid = c.slc_valid(t);
        if (valid <= n) {  // every valid block
          for (int64_t j = 0; j < valid; ++j) out[j] = int32_t(j);
          prev.clear();
          continue;
        }
        // Forced: [0, init) and [lo, own]; the others are [init, lo) (own is the last valid block).
        const int64_t own = t / ls, lo = std::max<int64_t>(0, own - c.local_blocks + 1);
        const int64_t o0 = std::min(c.init_blocks, lo), o1 = lo;  // the others: [o0, o1) beyond init
        int64_t nf = 0;
        for (int64_t j = 0; j < valid; ++j) nf += (j < c.init_blocks || j >= lo);
        const int64_t K = n - nf, M = o1 - std::max(o0, c.init_blocks);
        const int64_t first = std::max(o0, c.init_blocks);
        cur.clear();
        if (sp.kind == "recent") {
          for (int64_t j = o1 - K; j < o1; ++j) cur.push_back(int32_t(j));
        } else {
          if (sp.kind == "clustered")
            for (int32_t j : prev)
              if (j >= first && j < o1 && int64_t(cur.size()) < K && rng.uniform() < keep) cur.push_back(j);
          const int64_t need = K - int64_t(cur.size());
          if (need > 0 && M <= 4 * K) {  // few others: draw from the explicit pool
            pool.clear();
            for (int64_t j = first; j < o1; ++j)
              if (std::find(cur.begin(), cur.end(), int32_t(j)) == cur.end()) pool.push_back(int32_t(j));
            for (int64_t i = 0; i < need; ++i) {
              const size_t k = size_t(i) + size_t(rng.below(uint64_t(pool.size()) - uint64_t(i)));
              std::swap(pool[size_t(i)], pool[k]);
              cur.push_back(pool[size_t(i)]);
            }
          } else {
            while (int64_t(cur.size()) < K) {  // rejection: at most 1/4 of the pool is taken
              const int32_t j = int32_t(first + int64_t(rng.below(uint64_t(M))));
              if (std::find(cur.begin(), cur.end(), j) == cur.end()) cur.push_back(j);
            }
          }
        }
        prev = cur;
        for (int64_t j = 0; j < valid; ++j)
          if (j < c.init_blocks || j >= lo) cur.push_back(int32_t(j));
        std::sort(cur.begin(), cur.end());
        std::copy(cur.begin(), cur.end(), out);
      }
    }
  return s;
}

// ================================================================ the replay

namespace {

// A batch of rows loaded by one pipeline step: `rows` rows of two tensors (K and V, or the
// compressed ones) from row addresses base + r * stride.
struct RowLoad {
  uint64_t base[2] = {0, 0};
  uint64_t stride[2] = {0, 0};
  int64_t bytes[2] = {0, 0};
  Stream stream[2] = {Stream::K, Stream::V};
  int64_t rows = 0;
};

// One tile's program: the head accesses (lists, q), then one RowLoad per step, then the tail
// accesses (outputs).
struct Tile {
  std::vector<Access> head, tail;
  std::vector<RowLoad> loads;
  size_t next = 0;
  int phase = 0;  // 0 head, 1 loads, 2 tail, 3 done
  bool step(MemoryModel& m) {
    switch (phase) {
      case 0:
        for (const Access& a : head) m.access(a);
        phase = loads.empty() ? 2 : 1;
        return true;
      case 1: {
        const RowLoad& l = loads[next++];
        for (int x = 0; x < 2; ++x)
          if (l.bytes[x] > 0)
            for (int64_t r = 0; r < l.rows; ++r) m.access(l.base[x] + uint64_t(r) * l.stride[x], l.bytes[x], l.stream[x], false);
        if (next == loads.size()) phase = 2;
        return true;
      }
      case 2:
        for (const Access& a : tail) m.access(a);
        phase = 3;
        return true;
      default:
        return false;
    }
  }
};

// Runs `ctas` CTAs of `tiles_per_cta` tiles, `resident` at once, in launch order: every resident
// tile takes one step per round (the warps progress together); a CTA's slot goes to the next CTA
// when all its tiles are done. make(cta, i, tile) builds tile i of a CTA (false: no such tile).
template <class Make>
void replay(int64_t ctas, int64_t tiles_per_cta, int64_t resident, Make&& make, MemoryModel& m,
            const std::function<void(double)>& progress, double done0, double weight) {
  struct Slot {
    std::vector<Tile> tiles;
    bool active = false;
  };
  std::vector<Slot> slots(size_t(std::max<int64_t>(1, std::min(resident, ctas))));
  int64_t next = 0, finished = 0;
  auto load = [&](Slot& s) {
    s.tiles.clear();
    s.active = false;
    while (next < ctas && !s.active) {
      for (int64_t i = 0; i < tiles_per_cta; ++i) {
        Tile t;
        if (make(next, i, t)) s.tiles.push_back(std::move(t));
      }
      ++next;
      s.active = !s.tiles.empty();
      if (!s.active) ++finished;
    }
  };
  for (Slot& s : slots) load(s);
  auto last = std::chrono::steady_clock::now();
  bool any = true;
  while (any) {
    any = false;
    for (Slot& s : slots) {
      if (!s.active) continue;
      bool stepped = false;
      for (Tile& t : s.tiles) stepped |= t.step(m);
      if (!stepped) {
        ++finished;
        load(s);
      }
      any |= s.active;
    }
    if (progress) {
      const auto now = std::chrono::steady_clock::now();
      if (now - last > std::chrono::milliseconds(250)) {
        last = now;
        progress(done0 + weight * double(finished) / double(std::max<int64_t>(ctas, 1)));
      }
    }
  }
}

// Where each tensor lives: sequential allocations, 2 MiB aligned (as cudaMalloc of large buffers).
struct Layout {
  uint64_t q, k, v, idx, o_slc, lse_slc, partial, gates, kc, vc, o_cmp, lse_cmp, o, lse_win;
};

Layout make_layout(const Config& c, int64_t N, int64_t Nc, int eb) {
  uint64_t at = uint64_t(1) << 32;
  auto take = [&](double bytes) {
    const uint64_t a = at, align = uint64_t(1) << 21;
    at += (uint64_t(bytes) + align - 1) / align * align + align;
    return a;
  };
  Layout L;
  L.q = take(double(N * c.Hq * c.dk * eb));
  L.k = take(double(N * c.Hkv * c.dk * eb));
  L.v = take(double(N * c.Hkv * c.dv * eb));
  L.idx = take(double(N * c.Hkv * c.slc_count * 4));
  L.o_slc = take(double(N * c.Hq * c.dv * eb));
  L.lse_slc = take(double(N * c.Hq * 4));
  L.partial = take(double(N * c.Hkv * c.slc_count) * double(c.G() * (c.dv * 4 + 8)));
  L.gates = take(double(N * c.Hq * 3 * 4));
  L.kc = take(double(Nc * c.Hkv * c.dk * eb));
  L.vc = take(double(Nc * c.Hkv * c.dv * eb));
  L.o_cmp = take(double(N * c.Hq * c.dv * eb));
  L.lse_cmp = take(double(N * c.Hq * 4));
  L.o = take(double(N * c.Hq * c.dv * eb));
  L.lse_win = take(double(N * c.Hq * 4));
  return L;
}

struct Ctx {
  const Config& c;
  const Selection& sel;
  const SimOptions& opt;
  Layout L;
  int eb;
  int64_t N, B, G;
  std::vector<int64_t> cu, cu_cmp;
};

// Tiles of P consecutive positions over the packed sequences: (sequence, first position).
std::vector<std::pair<int64_t, int64_t>> position_tiles(const Ctx& x, int64_t P) {
  std::vector<std::pair<int64_t, int64_t>> t;
  for (int64_t b = 0; b < x.B; ++b)
    for (int64_t t0 = 0; t0 < x.cu[size_t(b) + 1] - x.cu[size_t(b)]; t0 += P) t.emplace_back(b, t0);
  return t;
}

// Tile w of (Hkv groups) x (tiles) x (head slices) in the order asked: (group, tile, slice).
struct TileIndex {
  int64_t g, x, hs;
};
TileIndex tile_index(int64_t w, int64_t Hkv, int64_t X, int64_t Hs, TileOrder o) {
  if (o == TileOrder::GroupMajor) return {w / (X * Hs), w / Hs % X, w % Hs};
  return {w / Hs % Hkv, w / (Hkv * Hs), w % Hs};
}

double round_rows(int64_t rows) { return double((rows + 15) / 16 * 16); }  // the MMA's m16 tiles

// ---- selection, query-centric ----
void slc_query(const Ctx& x, BranchResult& r, MemoryModel& m, int64_t resident, double done0, double weight) {
  const Config& c = x.c;
  const Schedule& s = x.opt.schedule;
  const int64_t G = x.G, Ht = s.tile_heads > 0 ? s.tile_heads : G;
  if (G % Ht) throw ConfigError(cat("tile heads = ", Ht, " must divide G = ", G));
  const int64_t Hs = G / Ht;
  int64_t P = s.tile_positions > 0 ? s.tile_positions : std::max<int64_t>(1, 16 / G);
  int64_t tpc = s.tiles_per_cta;
  if (s.cta_union) P *= tpc, tpc = 1;  // the CTA's tiles share one union: one tile of their positions
  const auto tiles = position_tiles(x, P);
  const int64_t X = int64_t(tiles.size()), W = c.Hkv * X * Hs, ctas = (W + tpc - 1) / tpc;
  const int64_t n = c.slc_count, ls = c.slc_len, eb = x.eb;
  const double rows_exec = round_rows(P * Ht) * 2.0 * double(c.dk + c.dv);
  const int32_t* idx = x.sel.block_idx.data();
  std::vector<int32_t> uni;
  auto make = [&](int64_t cta, int64_t i, Tile& t) {
    const int64_t w = cta * tpc + i;
    if (i >= tpc || w >= W) return false;
    const TileIndex ti = tile_index(w, c.Hkv, X, Hs, s.order);
    const auto [b, t0] = tiles[size_t(ti.x)];
    const int64_t row0 = x.cu[size_t(b)], Tb = x.cu[size_t(b) + 1] - row0, t1 = std::min(Tb, t0 + P);
    const int64_t g = ti.g, h0 = g * G + ti.hs * Ht;
    uni.clear();
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t rr = row0 + tt;
      t.head.push_back({x.L.idx + uint64_t((rr * c.Hkv + g) * n * 4), n * 4, Stream::Idx, false});
      t.head.push_back({x.L.q + uint64_t((rr * c.Hq + h0) * c.dk * eb), Ht * c.dk * eb, Stream::Q, false});
      t.tail.push_back({x.L.o_slc + uint64_t((rr * c.Hq + h0) * c.dv * eb), Ht * c.dv * eb, Stream::O, true});
      t.tail.push_back({x.L.lse_slc + uint64_t((rr * c.Hq + h0) * 4), Ht * 4, Stream::Lse, true});
      const int32_t* l = idx + (rr * c.Hkv + g) * n;
      for (int64_t mm = 0; mm < n && l[mm] >= 0; ++mm) uni.push_back(l[mm]);
    }
    std::sort(uni.begin(), uni.end());
    uni.erase(std::unique(uni.begin(), uni.end()), uni.end());
    for (int32_t j : uni) {
      // Rows past the tile's last position are masked for every row: not loaded (zero-filled).
      const int64_t u_end = std::min((int64_t(j) + 1) * ls, t1);
      ++r.kv_block_loads;
      for (int64_t u0 = int64_t(j) * ls; u0 < u_end; u0 += s.chunk_rows) {
        RowLoad L;
        L.rows = std::min(s.chunk_rows, u_end - u0);
        L.base[0] = x.L.k + uint64_t(((row0 + u0) * c.Hkv + g) * c.dk * eb);
        L.base[1] = x.L.v + uint64_t(((row0 + u0) * c.Hkv + g) * c.dv * eb);
        L.stride[0] = uint64_t(c.Hkv * c.dk * eb), L.stride[1] = uint64_t(c.Hkv * c.dv * eb);
        L.bytes[0] = c.dk * eb, L.bytes[1] = c.dv * eb;
        t.loads.push_back(L);
        r.executed_flops += double(s.chunk_rows) * rows_exec;
      }
    }
    ++r.tiles;
    return true;
  };
  r.ctas = ctas;
  replay(ctas, tpc, resident, make, m, x.opt.progress, done0, weight);
}

// ---- selection, block-centric ----
void slc_block(const Ctx& x, BranchResult& r, MemoryModel& m, int64_t resident, double done0, double weight) {
  const Config& c = x.c;
  const Schedule& s = x.opt.schedule;
  const int64_t n = c.slc_count, ls = c.slc_len, eb = x.eb, G = x.G, Hkv = c.Hkv;
  const int32_t* idx = x.sel.block_idx.data();
  // Items (sequence, group, block, [p0, p1) of its list): the positions that selected the block.
  struct Item {
    int64_t b, g, j, p0, p1;
  };
  std::vector<int64_t> list_off;  // per (b, g, j): start in `pos`
  std::vector<int32_t> pos, slot;  // sequence-local position; its slot m in the position's list
  std::vector<int64_t> cnt;
  std::vector<Item> items;
  std::vector<int64_t> base_list(size_t(x.B) + 1, 0);
  for (int64_t b = 0; b < x.B; ++b)
    base_list[size_t(b) + 1] = base_list[size_t(b)] + Hkv * c.num_slc_blocks(x.cu[size_t(b) + 1] - x.cu[size_t(b)]);
  const int64_t lists = base_list.back();
  cnt.assign(size_t(lists) + 1, 0);
  auto list_of = [&](int64_t b, int64_t g, int64_t j) {
    return base_list[size_t(b)] + g * c.num_slc_blocks(x.cu[size_t(b) + 1] - x.cu[size_t(b)]) + j;
  };
  for (int64_t b = 0; b < x.B; ++b)
    for (int64_t rr = x.cu[size_t(b)]; rr < x.cu[size_t(b) + 1]; ++rr)
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t mm = 0; mm < n; ++mm) {
          const int32_t j = idx[(rr * Hkv + g) * n + mm];
          if (j >= 0) ++cnt[size_t(list_of(b, g, j)) + 1];
        }
  for (int64_t i = 0; i < lists; ++i) cnt[size_t(i) + 1] += cnt[size_t(i)];
  list_off = cnt;
  pos.resize(size_t(cnt.back()));
  slot.resize(size_t(cnt.back()));
  std::vector<int64_t> fill(cnt.begin(), cnt.end() - 1);
  for (int64_t b = 0; b < x.B; ++b)
    for (int64_t rr = x.cu[size_t(b)]; rr < x.cu[size_t(b) + 1]; ++rr)
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t mm = 0; mm < n; ++mm) {
          const int32_t j = idx[(rr * Hkv + g) * n + mm];
          if (j < 0) continue;
          const int64_t at = fill[size_t(list_of(b, g, j))]++;
          pos[size_t(at)] = int32_t(rr - x.cu[size_t(b)]), slot[size_t(at)] = int32_t(mm);
        }
  for (int64_t g = 0; g < Hkv; ++g)
    for (int64_t b = 0; b < x.B; ++b)
      for (int64_t j = 0; j < c.num_slc_blocks(x.cu[size_t(b) + 1] - x.cu[size_t(b)]); ++j) {
        const int64_t li = list_of(b, g, j);
        for (int64_t p0 = list_off[size_t(li)]; p0 < list_off[size_t(li) + 1]; p0 += s.block_positions)
          items.push_back({b, g, j, p0, std::min(p0 + s.block_positions, list_off[size_t(li) + 1])});
      }
  const int64_t pbytes = G * (c.dv * 4 + 8);  // fp32 partial o and (max, sum) per head
  auto make = [&](int64_t cta, int64_t i, Tile& t) {
    if (i > 0 || cta >= int64_t(items.size())) return false;
    const Item& it = items[size_t(cta)];
    const int64_t row0 = x.cu[size_t(it.b)], tmax = pos[size_t(it.p1 - 1)];
    const int64_t u_end = std::min((it.j + 1) * ls, tmax + 1);
    ++r.kv_block_loads;
    for (int64_t u0 = it.j * ls; u0 < u_end; u0 += s.chunk_rows) {
      RowLoad L;
      L.rows = std::min(s.chunk_rows, u_end - u0);
      L.base[0] = x.L.k + uint64_t(((row0 + u0) * Hkv + it.g) * c.dk * eb);
      L.base[1] = x.L.v + uint64_t(((row0 + u0) * Hkv + it.g) * c.dv * eb);
      L.stride[0] = uint64_t(Hkv * c.dk * eb), L.stride[1] = uint64_t(Hkv * c.dv * eb);
      L.bytes[0] = c.dk * eb, L.bytes[1] = c.dv * eb;
      t.loads.push_back(L);
    }
    // The positions follow the block's rows: each reads its G heads and writes one partial.
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t rr = row0 + pos[size_t(p)];
      t.tail.push_back({x.L.q + uint64_t((rr * c.Hq + it.g * G) * c.dk * eb), G * c.dk * eb, Stream::Q, false});
      t.tail.push_back({x.L.partial + uint64_t(((rr * Hkv + it.g) * n + slot[size_t(p)]) * pbytes), pbytes,
                        Stream::Partial, true});
      r.executed_flops += double(u_end - it.j * ls) * round_rows(G) * 2.0 * double(c.dk + c.dv);
    }
    ++r.tiles;
    return true;
  };
  r.ctas = int64_t(items.size());
  replay(int64_t(items.size()), 1, resident, make, m, x.opt.progress, done0, weight * 0.9);
  // The combine: per (position, group) its n partials in, o and lse out, tiles of 16 / G positions.
  const int64_t P = std::max<int64_t>(1, 16 / G);
  const auto tiles = position_tiles(x, P);
  const int64_t W = Hkv * int64_t(tiles.size());
  auto make_combine = [&](int64_t cta, int64_t, Tile& t) {
    if (cta >= W) return false;
    const TileIndex ti = tile_index(cta, Hkv, int64_t(tiles.size()), 1, TileOrder::GroupMajor);
    const auto [b, t0] = tiles[size_t(ti.x)];
    const int64_t row0 = x.cu[size_t(b)], t1 = std::min(x.cu[size_t(b) + 1] - row0, t0 + P);
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t rr = row0 + tt;
      t.head.push_back({x.L.idx + uint64_t((rr * Hkv + ti.g) * n * 4), n * 4, Stream::Idx, false});
      for (int64_t mm = 0; mm < n; ++mm)
        if (idx[(rr * Hkv + ti.g) * n + mm] >= 0)
          t.head.push_back({x.L.partial + uint64_t(((rr * Hkv + ti.g) * n + mm) * pbytes), pbytes, Stream::Partial, false});
      t.tail.push_back({x.L.o_slc + uint64_t((rr * c.Hq + ti.g * G) * c.dv * eb), G * c.dv * eb, Stream::O, true});
      t.tail.push_back({x.L.lse_slc + uint64_t((rr * c.Hq + ti.g * G) * 4), G * 4, Stream::Lse, true});
    }
    return true;
  };
  replay(W, 1, resident, make_combine, m, x.opt.progress, done0 + weight * 0.9, weight * 0.1);
}

// ---- compression and window branches: FlashAttention-style tiles of 128 query rows ----
// cmp (cmp_attn v4): pass 1 reads q and the visible compressed K and V rows in chunks of 64 and
// writes O_cmp and lse; pass 2 reads q, lse and the compressed K rows again and writes the tile's
// block lists. win (win_attn + combine): q and the gates, the window's raw K and V rows, then
// O_cmp and O_slc for the gated sum, and o out.
void dense_branch(const Ctx& x, Branch br, int pass, BranchResult& r, MemoryModel& m, int64_t resident, double done0,
                  double weight) {
  const Config& c = x.c;
  const int64_t G = x.G, eb = x.eb, Hkv = c.Hkv, P = std::max<int64_t>(1, 128 / G), chunk = 64;
  const auto tiles = position_tiles(x, P);
  const int64_t X = int64_t(tiles.size()), W = Hkv * X;
  auto make = [&](int64_t cta, int64_t, Tile& t) {
    if (cta >= W) return false;
    const TileIndex ti = tile_index(cta, Hkv, X, 1, x.opt.schedule.order);
    const auto [b, t0] = tiles[size_t(ti.x)];
    const int64_t row0 = x.cu[size_t(b)], t1 = std::min(x.cu[size_t(b) + 1] - row0, t0 + P), g = ti.g;
    const int64_t rows = (t1 - t0) * G;
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t rr = row0 + tt;
      t.head.push_back({x.L.q + uint64_t((rr * c.Hq + g * G) * c.dk * eb), G * c.dk * eb, Stream::Q, false});
      if (br == Branch::Cmp && pass == 1)
        t.head.push_back({x.L.lse_cmp + uint64_t((rr * c.Hq + g * G) * 4), G * 4, Stream::Lse, false});
      if (br == Branch::Win) {
        t.head.push_back({x.L.gates + uint64_t((rr * c.Hq + g * G) * 12), G * 12, Stream::Gates, false});
        t.tail.push_back({x.L.o_cmp + uint64_t((rr * c.Hq + g * G) * c.dv * eb), G * c.dv * eb, Stream::O, false});
        t.tail.push_back({x.L.o_slc + uint64_t((rr * c.Hq + g * G) * c.dv * eb), G * c.dv * eb, Stream::O, false});
        t.tail.push_back({x.L.o + uint64_t((rr * c.Hq + g * G) * c.dv * eb), G * c.dv * eb, Stream::O, true});
        t.tail.push_back({x.L.lse_win + uint64_t((rr * c.Hq + g * G) * 4), G * 4, Stream::Lse, true});
      } else if (pass == 0) {
        t.tail.push_back({x.L.o_cmp + uint64_t((rr * c.Hq + g * G) * c.dv * eb), G * c.dv * eb, Stream::O, true});
        t.tail.push_back({x.L.lse_cmp + uint64_t((rr * c.Hq + g * G) * 4), G * 4, Stream::Lse, true});
      } else {
        t.tail.push_back({x.L.idx + uint64_t((rr * Hkv + g) * c.slc_count * 4), c.slc_count * 4, Stream::Idx, true});
      }
    }
    int64_t k0, k1, base_row;
    uint64_t kb, vb;
    Stream ks, vs;
    if (br == Branch::Cmp) {
      k0 = 0, k1 = c.cmp_visible(t1 - 1), base_row = x.cu_cmp[size_t(b)];
      kb = x.L.kc, vb = x.L.vc, ks = Stream::Kc, vs = Stream::Vc;
    } else {
      k0 = c.win_start(t0), k1 = t1, base_row = row0;
      kb = x.L.k, vb = x.L.v, ks = Stream::K, vs = Stream::V;
    }
    const bool with_v = !(br == Branch::Cmp && pass == 1);
    for (int64_t u0 = k0; u0 < k1; u0 += chunk) {
      RowLoad L;
      L.rows = std::min(chunk, k1 - u0);
      L.base[0] = kb + uint64_t(((base_row + u0) * Hkv + g) * c.dk * eb);
      L.base[1] = vb + uint64_t(((base_row + u0) * Hkv + g) * c.dv * eb);
      L.stride[0] = uint64_t(Hkv * c.dk * eb), L.stride[1] = uint64_t(Hkv * c.dv * eb);
      L.bytes[0] = c.dk * eb, L.bytes[1] = with_v ? c.dv * eb : 0;
      L.stream[0] = ks, L.stream[1] = vs;
      t.loads.push_back(L);
      r.executed_flops += double(chunk) * round_rows(rows) * 2.0 * double(with_v ? c.dk + c.dv : c.dk);
    }
    ++r.tiles;
    return true;
  };
  r.ctas += W;
  replay(W, 1, resident, make, m, x.opt.progress, done0, weight);
}

}  // namespace

void check_options(const SimOptions& opt) {
  opt.gpu.l2.validate();
  const Schedule& s = opt.schedule;
  if (opt.dtype_bytes != 2 && opt.dtype_bytes != 4)
    throw ConfigError(cat("dtype bytes = ", opt.dtype_bytes, ": expected 2 (bf16, fp16) or 4 (fp32)"));
  for (auto [name, v] : {std::pair{"tile positions", s.tile_positions}, {"tile heads", s.tile_heads},
                         {"ctas per SM", s.ctas_per_sm}, {"SMs", s.sms}})
    if (v < 0) throw ConfigError(cat(name, " = ", v, ": expected >= 0 (0: the default)"));
  for (auto [name, v] : {std::pair{"tiles per CTA", s.tiles_per_cta}, {"chunk rows", s.chunk_rows},
                         {"block positions", s.block_positions}})
    if (v < 1) throw ConfigError(cat(name, " = ", v, ": expected >= 1"));
  if ((s.sms > 0 ? s.sms : opt.gpu.sms) < 1) throw ConfigError("SMs = 0: give the GPU's SM count");
  if (opt.sample < 0) throw ConfigError(cat("sample = ", opt.sample, ": expected >= 0 (0: automatic)"));
  if (opt.reuse_sample < -1) throw ConfigError(cat("reuse-sample = ", opt.reuse_sample, ": expected >= -1"));
  if (opt.branches.empty()) throw ConfigError("branches: expected at least one of cmp, slc, win");
}

SimResult simulate(const Config& c, const Selection& sel, const SimOptions& opt) {
  const auto t_start = std::chrono::steady_clock::now();
  c.validate();
  check_selection(c, sel, "block_idx");
  check_options(opt);
  const Schedule& s = opt.schedule;
  const int64_t sms = s.sms > 0 ? s.sms : opt.gpu.sms;
  if (sms < 1) throw ConfigError(cat("SMs = ", sms, ": give the GPU's SM count"));

  Ctx x{c, sel, opt, {}, opt.dtype_bytes, sel.cu_seqlens.back(), int64_t(sel.cu_seqlens.size()) - 1, c.G(),
        sel.cu_seqlens, {0}};
  for (int64_t b = 0; b < x.B; ++b)
    x.cu_cmp.push_back(x.cu_cmp.back() + c.num_cmp_blocks(x.cu[size_t(b) + 1] - x.cu[size_t(b)]));
  x.L = make_layout(c, x.N, x.cu_cmp.back(), x.eb);

  SimResult res;
  res.ctas_per_sm = s.ctas_per_sm > 0 ? s.ctas_per_sm : kernel_ctas_per_sm(c, s, opt.gpu, x.eb);

  // Line accesses of the heaviest stream (the selection's K/V rows), for the automatic sampling:
  // about 40 M simulated lines and 4 M tracked ones keep T = 64k under a minute (docs/simulate.md).
  double lines = 0;
  const double row_lines = std::ceil(double((c.dk + c.dv) * x.eb) / double(opt.gpu.l2.line_bytes));
  for (int64_t b = 0; b < x.B; ++b)
    for (int64_t t = 0; t < x.cu[size_t(b) + 1] - x.cu[size_t(b)]; t += 64)
      lines += 64.0 * double(slc_tokens(c, t)) * double(c.Hkv) * row_lines;
  // Per-head tiles ask for the K/V rows once per slice of heads.
  if (s.kind == ScheduleKind::QueryCentric && s.tile_heads > 0) lines *= double(c.G() / s.tile_heads);
  auto pow2_at_least = [](double v) {
    int64_t k = 1;
    while (double(k) < v) k *= 2;
    return k;
  };
  res.sample = opt.sample > 0 ? opt.sample : std::min(pow2_at_least(lines / 40e6), int64_t(opt.gpu.l2.sets() / 64 + 1));
  res.reuse_sample = opt.reuse_sample > 0 ? opt.reuse_sample : opt.reuse_sample < 0 ? -1 : pow2_at_least(lines / 4e6);

  const double nb = double(opt.branches.size());
  for (size_t bi = 0; bi < opt.branches.size(); ++bi) {
    const Branch br = opt.branches[bi];
    BranchResult r;
    r.branch = br;
    MemoryModel m(opt.gpu.l2, res.sample, res.reuse_sample, opt.seed);
    const double d0 = double(bi) / nb, w = 1.0 / nb;
    // CTAs resident at once: the selection kernel's occupancy; the dense branches' 2 CTAs per SM.
    if (br == Branch::Slc) {
      if (s.kind == ScheduleKind::QueryCentric) {
        r.ctas_resident = res.ctas_per_sm * sms;
        slc_query(x, r, m, r.ctas_resident, d0, w);
      } else {
        const int64_t per_cta = c.slc_len * (c.dk + c.dv) * x.eb + opt.gpu.smem_reserved;
        const int64_t per_sm = s.ctas_per_sm > 0 ? s.ctas_per_sm : std::clamp<int64_t>(opt.gpu.smem_per_sm / per_cta, 1, 32);
        r.ctas_resident = per_sm * sms;
        slc_block(x, r, m, r.ctas_resident, d0, w);
      }
      for (int64_t b = 0; b < x.B; ++b) {
        const int64_t row0 = x.cu[size_t(b)];
        for (int64_t t = 0; t < x.cu[size_t(b) + 1] - row0; ++t)
          for (int64_t g = 0; g < c.Hkv; ++g) {
            const int32_t* l = sel.block_idx.data() + ((row0 + t) * c.Hkv + g) * c.slc_count;
            for (int64_t mm = 0; mm < c.slc_count && l[mm] >= 0; ++mm)
              r.useful_flops += double(std::min((int64_t(l[mm]) + 1) * c.slc_len, t + 1) - int64_t(l[mm]) * c.slc_len) *
                                2.0 * double(c.dk + c.dv) * double(x.G);
          }
      }
    } else {
      r.ctas_resident = 2 * sms;
      if (br == Branch::Cmp) {
        dense_branch(x, br, 0, r, m, r.ctas_resident, d0, w / 2);
        dense_branch(x, br, 1, r, m, r.ctas_resident, d0 + w / 2, w / 2);
      } else {
        dense_branch(x, br, 0, r, m, r.ctas_resident, d0, w);
      }
      for (int64_t b = 0; b < x.B; ++b) {
        const ForwardFlops f = nsa_forward_flops(c, x.cu[size_t(b) + 1] - x.cu[size_t(b)]);
        r.useful_flops += br == Branch::Cmp ? f.cmp : f.win;
      }
    }
    m.finish(r);
    for (int64_t b = 0; b < x.B; ++b) {
      const Traffic tr = prefill_traffic(c, x.cu[size_t(b) + 1] - x.cu[size_t(b)], 1, x.eb);
      r.formula_bytes += br == Branch::Cmp ? tr.cmp.bytes : br == Branch::Slc ? tr.slc.bytes : tr.win.bytes;
    }
    const GpuSpec& gp = opt.gpu;
    r.ms_hbm = gp.copy_bytes_per_s > 0 ? 1e3 * (r.hbm_read_bytes + r.hbm_write_bytes) / gp.copy_bytes_per_s : 0;
    r.ms_l2 = gp.l2_bytes_per_s > 0 ? 1e3 * (r.l2_read_bytes + r.l2_write_bytes) / gp.l2_bytes_per_s : 0;
    r.ms_matrix = gp.matrix_flops_per_s > 0 ? 1e3 * r.executed_flops / gp.matrix_flops_per_s : 0;
    r.predicted_ms = std::max({r.ms_hbm, r.ms_l2, r.ms_matrix});
    r.bound = r.predicted_ms == r.ms_hbm ? "hbm" : r.predicted_ms == r.ms_l2 ? "l2" : "matrix";
    res.branches.push_back(std::move(r));
  }
  if (opt.progress) opt.progress(1.0);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return res;
}

}  // namespace nsa::analysis
