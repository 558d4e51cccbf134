// The memory simulator (analysis/simulate.hpp): the cache on hand-computed traces (LRU and FIFO
// eviction order, sectors, write-back), reuse distances against their definition and against a
// fully associative LRU cache, set sampling within its stated error, the selection generators, and
// the schedules' byte counts against plain loops over the selection.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "rng.hpp"
#include "simulate.hpp"

using namespace nsa;
namespace an = nsa::analysis;

namespace {

an::CacheSpec tiny(int64_t sets, int64_t ways, an::CachePolicy p = an::CachePolicy::Lru) {
  an::CacheSpec s;
  s.size_bytes = sets * ways * 128;
  s.line_bytes = 128, s.sector_bytes = 32, s.ways = ways, s.policy = p;
  s.hashed_index = false;
  return s;
}

an::GpuSpec gpu_with(int64_t l2_bytes, int64_t ways = 16) {
  an::GpuSpec g = an::gpu_preset("h100");
  g.l2.size_bytes = l2_bytes;
  g.l2.ways = ways;
  return g;
}

Config small_cfg(int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv, int64_t ls, int64_t n) {
  Config c;
  c.Hq = Hq, c.Hkv = Hkv, c.dk = dk, c.dv = dv;
  c.cmp_len = ls, c.cmp_stride = ls, c.slc_len = ls, c.slc_count = n, c.window = 64;
  return c;
}

const an::BranchResult& branch(const an::SimResult& r, an::Branch b) {
  for (const auto& x : r.branches)
    if (x.branch == b) return x;
  FAIL("branch not simulated");
  return r.branches.front();
}

double kv_l2(const an::BranchResult& r) {
  return r.streams[int(an::Stream::K)].l2_read_bytes + r.streams[int(an::Stream::V)].l2_read_bytes;
}
double kv_hbm(const an::BranchResult& r) {
  return r.streams[int(an::Stream::K)].hbm_read_bytes + r.streams[int(an::Stream::V)].hbm_read_bytes;
}

}  // namespace

TEST_CASE("simulate: cache LRU eviction order, one set of two ways") {
  an::Cache c(tiny(1, 2));
  CHECK(c.access(10, 0xF, false) == 4);  // A: cold, 4 sectors
  CHECK(c.access(11, 0xF, false) == 4);  // B
  CHECK(c.access(10, 0xF, false) == 0);  // A hits and becomes the most recent
  CHECK(c.set_contents(10) == std::vector<uint64_t>{10, 11});
  CHECK(c.access(12, 0xF, false) == 4);  // C evicts B, the least recently used
  CHECK(c.set_contents(10) == std::vector<uint64_t>{12, 10});
  CHECK(c.access(11, 0xF, false) == 4);  // B again: evicts A
  CHECK(c.set_contents(10) == std::vector<uint64_t>{11, 12});
  CHECK(c.access(12, 0xF, false) == 0);
  CHECK(c.counts().read_sectors == 6 * 4);
  CHECK(c.counts().read_miss_sectors == 4 * 4);
}

TEST_CASE("simulate: cache FIFO evicts the oldest fill whatever the hits") {
  an::Cache c(tiny(1, 2, an::CachePolicy::Fifo));
  c.access(10, 0xF, false);
  c.access(11, 0xF, false);
  CHECK(c.access(10, 0xF, false) == 0);  // a hit does not renew A
  CHECK(c.access(12, 0xF, false) == 4);  // C evicts A, filled first
  CHECK(c.set_contents(10) == std::vector<uint64_t>{12, 11});
  CHECK(c.access(10, 0xF, false) == 4);
}

TEST_CASE("simulate: sectors fill separately, writes allocate and are written back on eviction") {
  an::Cache c(tiny(2, 1));  // two sets (line % 2), direct mapped
  CHECK(c.access(4, 0x3, false) == 2);   // sectors 0-1 of line 4
  CHECK(c.access(4, 0x6, false) == 1);   // sector 2 is new, 1 is there
  CHECK(c.access(4, 0xF, false) == 1);   // sector 3
  CHECK(c.access(5, 0x1, true) == 1);    // a write allocates line 5 (set 1) without fetching
  CHECK(c.access(5, 0x1, false) == 0);   // and is read back from the cache
  CHECK(c.counts().writeback_sectors == 0);
  CHECK(c.access(7, 0xF, false) == 4);   // line 7 maps to set 1: the dirty sector of line 5 goes out
  CHECK(c.counts().writeback_sectors == 1);
  CHECK(c.access(6, 0xF, false) == 4);   // set 0: line 4 (clean) evicted, nothing written
  CHECK(c.counts().writeback_sectors == 1);
  CHECK(c.counts().read_miss_sectors == 2 + 1 + 1 + 4 + 4);
}

TEST_CASE("simulate: a trace that fits in L2 reads each line from HBM once") {
  an::CacheSpec l2 = tiny(64, 16);  // 128 KiB
  l2.hashed_index = true;
  an::MemoryModel m(l2, 1, 1);
  Rng rng(3);
  // 100 blocks of 512 B (4 lines each), 20 passes in random order: 50 KiB, well inside 128 KiB.
  for (int pass = 0; pass < 20; ++pass)
    for (int i = 0; i < 100; ++i) m.access(uint64_t(1 << 20) + rng.below(100) * 512, 512, an::Stream::K, false);
  an::BranchResult r;
  m.finish(r);
  CHECK(r.streams[int(an::Stream::K)].l2_read_bytes == 20 * 100 * 512);
  // Every block drawn at least once? Count the distinct ones, each read from HBM exactly once.
  Rng again(3);
  std::set<uint64_t> distinct;
  for (int k = 0; k < 2000; ++k) distinct.insert(again.below(100));
  CHECK(r.hbm_read_bytes == double(distinct.size()) * 512);
  CHECK(r.hbm_read_stderr == 0);
  // Reuse: every access but the cold ones has a distance below 100 blocks = 400 lines = 50 KiB.
  double warm = 0;
  for (int b = 0; b < an::ReuseHistogram::kBins; ++b) {
    if (r.reuse.count[size_t(b)] > 0) CHECK(an::ReuseHistogram::bin_lo(b) < 400 * 128);
    warm += r.reuse.count[size_t(b)];
  }
  CHECK(r.reuse.cold == double(distinct.size()) * 4);
  CHECK(warm + r.reuse.cold == 2000 * 4);
}

TEST_CASE("simulate: a trace with no reuse reads everything from HBM") {
  an::CacheSpec l2 = tiny(64, 16);
  l2.hashed_index = true;
  an::MemoryModel m(l2, 1, 1);
  // 4 MiB streamed once, in rows of 96 bytes that straddle lines: sectors counted exactly.
  const int64_t rows = 4 << 20 >> 5;
  for (int64_t i = 0; i < rows; ++i) m.access(uint64_t(3 << 20) + uint64_t(i) * 96 + 16, 96, an::Stream::Q, false);
  an::BranchResult r;
  m.finish(r);
  // Each 96-byte row starting at 16 mod 32 touches 4 sectors; a sector shared by neighbouring rows
  // is read twice from L2 but fetched once (the second read hits the line just filled).
  CHECK(r.l2_read_bytes == double(rows) * 4 * 32);
  CHECK(r.hbm_read_bytes == double((uint64_t(rows) * 96 + 16 + 31) / 32) * 32);
  CHECK(r.reuse.cold > 0);
}

TEST_CASE("simulate: a cyclic trace one line larger than a fully associative LRU cache always misses") {
  const int64_t C = 32;
  an::MemoryModel m(tiny(1, C), 1, 1);
  for (int pass = 0; pass < 5; ++pass)
    for (int64_t i = 0; i <= C; ++i) m.access(uint64_t(i) * 128, 128, an::Stream::K, false);
  an::BranchResult r;
  m.finish(r);
  CHECK(r.hbm_read_bytes == r.l2_read_bytes);
  // Each warm access has distance C (the other C lines of the cycle): bin of 32 * 128 = 4 KiB.
  CHECK(r.reuse.cold == C + 1);
  CHECK(r.reuse.count[3] == 4 * (C + 1));  // [4 KiB, 8 KiB)
}

TEST_CASE("simulate: reuse distances by definition, and fully associative LRU hits exactly below the capacity") {
  an::ReuseTracker rt(1);
  // a b c a b b: cold, cold, cold, 2 (b, c), 2 (c, a), 0.
  CHECK(rt.access(1) == -1);
  CHECK(rt.access(2) == -1);
  CHECK(rt.access(3) == -1);
  CHECK(rt.access(1) == 2);
  CHECK(rt.access(2) == 2);
  CHECK(rt.access(2) == 0);
  // A random trace long enough to compact the tracker's time axis several times (> 65536 accesses).
  const int64_t C = 64;
  an::Cache cache(tiny(1, C));
  an::ReuseTracker rt2(1);
  Rng rng(11);
  int64_t predicted_misses = 0;
  for (int i = 0; i < 300000; ++i) {
    const uint64_t line = rng.uniform() < 0.7 ? rng.below(80) : 1000 + rng.below(5000);
    const int64_t d = rt2.access(line);
    predicted_misses += d < 0 || d >= C;
    cache.access(line, 0xF, false);
  }
  CHECK(cache.counts().read_miss_sectors == 4 * predicted_misses);
}

TEST_CASE("simulate: sampled reuse distances follow the exact distribution") {
  // 400k accesses, 70% to 2,000 hot lines and 30% to 60,000 cold ones: two modes of distance.
  auto cdf = [](int64_t R) {
    an::ReuseTracker rt(R);
    Rng rng(21);
    std::vector<double> below = {0, 0, 0, 0};  // distance < 1k, 4k, 16k, 64k lines
    double n = 0;
    for (int i = 0; i < 400000; ++i) {
      const uint64_t line = rng.uniform() < 0.7 ? rng.below(2000) : 100000 + rng.below(60000);
      const int64_t d = rt.access(line);
      if (d == -2) continue;
      n += 1;
      for (int k = 0; k < 4; ++k) below[size_t(k)] += d >= 0 && d < (int64_t(1000) << (2 * k));
    }
    for (double& b : below) b /= n;
    return below;
  };
  const auto exact = cdf(1), s16 = cdf(16);
  for (size_t k = 0; k < 4; ++k) CHECK(std::abs(s16[k] - exact[k]) < 0.02);
  CHECK(exact[0] < 0.5);  // the two modes are apart: the test would see a wrong scale
  CHECK(exact[1] > 0.6);
}

TEST_CASE("simulate: set sampling estimates HBM bytes within its stated standard error") {
  an::CacheSpec l2 = tiny(512, 8);  // 512 KiB, hashed
  l2.hashed_index = true;
  auto run = [&](int64_t sample) {
    an::MemoryModel m(l2, sample, -1);
    Rng rng(5);
    // A working set of 1 MiB against 512 KiB: about half the accesses miss.
    for (int i = 0; i < 400000; ++i) m.access(uint64_t(1 << 24) + rng.below(8192) * 128, 128, an::Stream::K, false);
    an::BranchResult r;
    m.finish(r);
    return r;
  };
  const an::BranchResult exact = run(1), s8 = run(8);
  CHECK(exact.hbm_read_stderr == 0);
  CHECK(s8.l2_read_bytes == exact.l2_read_bytes);  // requests are counted exactly
  CHECK(s8.hbm_read_stderr > 0);
  CHECK(s8.hbm_read_stderr < 0.1 * exact.hbm_read_bytes);  // 64 of 512 sets: a few percent
  CHECK(std::abs(s8.hbm_read_bytes - exact.hbm_read_bytes) < 4 * s8.hbm_read_stderr);
  CHECK(exact.hbm_read_bytes > 0.3 * exact.l2_read_bytes);
  CHECK(exact.hbm_read_bytes < 0.7 * exact.l2_read_bytes);
}

TEST_CASE("simulate: selection generators keep the forced blocks, n, order; clustered shares blocks") {
  Config c = small_cfg(4, 2, 16, 16, 16, 6);
  for (const std::string kind : {"random", "clustered", "recent"}) {
    an::SelectionSpec sp;
    sp.kind = kind, sp.T = 700, sp.B = 2, sp.Hkv = 2, sp.seed = 7, sp.corr_len = 32;
    const an::Selection s = an::draw_selection(c, sp);
    CHECK_NOTHROW(an::check_selection(c, s, kind));
    for (int64_t r = 0; r < 1400; ++r) {
      const int64_t t = r % 700, valid = t / 16 + 1;
      for (int64_t g = 0; g < 2; ++g) {
        const int32_t* l = s.block_idx.data() + (r * 2 + g) * 6;
        const int64_t cnt = std::count_if(l, l + 6, [](int32_t j) { return j >= 0; });
        CHECK(cnt == std::min<int64_t>(6, valid));
        CHECK(std::find(l, l + 6, 0) != l + 6);                   // the initial block
        CHECK(std::find(l, l + 6, int32_t(t / 16)) != l + 6);    // the own block
        if (t >= 16) CHECK(std::find(l, l + 6, int32_t(t / 16 - 1)) != l + 6);  // the previous one
        if (kind == "recent" && valid > 6) CHECK(l[1] == t / 16 - 4);  // 0, then own-4 .. own
      }
    }
  }
  // Neighbouring positions share more of their other blocks with a long correlation length.
  auto shared = [&](const std::string& kind) {
    an::SelectionSpec sp;
    sp.kind = kind, sp.T = 4000, sp.Hkv = 1, sp.seed = 1, sp.corr_len = 64;
    const an::Selection s = an::draw_selection(c, sp);
    double same = 0;
    for (int64_t t = 1000; t < 4000; ++t) {
      const int32_t *a = s.block_idx.data() + (t - 1) * 6, *b = s.block_idx.data() + t * 6;
      for (int m = 0; m < 6; ++m) same += std::find(a, a + 6, b[m]) != a + 6;
    }
    return same / 3000;
  };
  const double rnd = shared("random"), clu = shared("clustered");
  CHECK(rnd < 3.3);  // the 3 forced blocks (4 across a block boundary) and rare coincidences
  CHECK(clu > 5.5);  // of 3 others, each kept with probability exp(-1/64) = 0.984
}

TEST_CASE("simulate: check_selection names the bad entry") {
  Config c = small_cfg(2, 1, 16, 16, 16, 3);
  an::Selection s;
  s.cu_seqlens = {0, 40};
  s.block_idx = Tensor<int32_t>({40, 1, 3}, -1);
  s.block_idx.data()[39 * 3] = 0, s.block_idx.data()[39 * 3 + 1] = 3;  // 3 > 39 / 16
  CHECK_THROWS_WITH_AS(an::check_selection(c, s, "x.npy"),
                       doctest::Contains("x.npy: entry [39, 0, 1] (position 39 of sequence 0) = 3 is not a valid block"),
                       InputError);
  s.block_idx.data()[39 * 3 + 1] = -1, s.block_idx.data()[39 * 3 + 2] = 1;
  CHECK_THROWS_WITH_AS(an::check_selection(c, s, "x.npy"), doctest::Contains("padding must come last"), InputError);
  Config c4 = c;
  c4.slc_count = 4;
  CHECK_THROWS_WITH_AS(an::check_selection(c4, s, "x.npy"), doctest::Contains("is not [N, Hkv, n] = [40, 1, 4]"),
                       InputError);
}

// Plain-loop counts of the query-centric selection kernel's K/V requests: per tile of P positions,
// the union of their blocks, rows up to the block's end and the tile's last position.
double query_centric_kv_bytes(const Config& c, const an::Selection& s, int64_t P, int64_t Ht, int eb) {
  double rows = 0;
  const int64_t N = s.cu_seqlens.back();
  for (int64_t g = 0; g < c.Hkv; ++g)
    for (int64_t t0 = 0; t0 < N; t0 += P) {
      std::set<int32_t> u;
      const int64_t t1 = std::min(N, t0 + P);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t m = 0; m < c.slc_count; ++m) {
          const int32_t j = s.block_idx.data()[(t * c.Hkv + g) * c.slc_count + m];
          if (j >= 0) u.insert(j);
        }
      for (int32_t j : u) rows += double(std::min<int64_t>((j + 1) * c.slc_len, t1) - j * c.slc_len);
    }
  return rows * double((c.dk + c.dv) * eb) * double(c.G() / Ht);
}

TEST_CASE("simulate: query-centric selection, L2 requests by plain loops, HBM reads once when it fits") {
  // G = 2: a tile (warp) holds 8 positions x 2 heads. dk = dv = 64 bf16: 128-byte rows, one line.
  Config c = small_cfg(4, 2, 64, 64, 32, 4);
  an::SelectionSpec sp;
  sp.kind = "random", sp.T = 1000, sp.Hkv = 2, sp.seed = 3;
  const an::Selection s = an::draw_selection(c, sp);
  an::SimOptions o;
  o.gpu = gpu_with(64 << 20);  // 64 MiB: K and V (2 x 256 KB) fit many times
  o.sample = 1, o.reuse_sample = 1;
  const an::SimResult res = an::simulate(c, s, o);
  const an::BranchResult& r = branch(res, an::Branch::Slc);
  CHECK(kv_l2(r) == query_centric_kv_bytes(c, s, 8, 2, 2));
  // Every row ever loaded comes from HBM once: all rows of every selected block up to T.
  std::set<std::pair<int64_t, int64_t>> rows;  // (group, row)
  for (int64_t t = 0; t < 1000; ++t)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t m = 0; m < 4; ++m) {
        const int32_t j = s.block_idx.data()[(t * 2 + g) * 4 + m];
        if (j >= 0)
          for (int64_t u = j * 32; u < std::min<int64_t>((j + 1) * 32, 1000); ++u)
            if (u <= (t / 8) * 8 + 7) rows.insert({g, u});
      }
  CHECK(kv_hbm(r) == double(rows.size()) * 2 * 128);
  // q is read once (no reuse), the lists once (16 B each: one 32-byte sector), outputs written once.
  CHECK(r.streams[int(an::Stream::Q)].l2_read_bytes == 1000.0 * 4 * 64 * 2);
  CHECK(r.streams[int(an::Stream::Q)].hbm_read_bytes == 1000.0 * 4 * 64 * 2);
  CHECK(r.streams[int(an::Stream::Idx)].l2_read_bytes == 1000.0 * 2 * 32);
  CHECK(r.streams[int(an::Stream::O)].l2_write_bytes == 1000.0 * 4 * 64 * 2);
  CHECK(r.hbm_write_bytes == 0);  // nothing evicted
  CHECK(r.tiles == 2 * 125);
  CHECK(r.ctas == 125);  // 2 tiles per CTA
  // Useful FLOPs: 2 (dk + dv) per visited key u <= t and query head.
  double keys = 0;
  for (int64_t t = 0; t < 1000; ++t)
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t m = 0; m < 4; ++m) {
        const int32_t j = s.block_idx.data()[(t * 2 + g) * 4 + m];
        if (j >= 0) keys += double(std::min<int64_t>((j + 1) * 32, t + 1) - j * 32);
      }
  CHECK(r.useful_flops == keys * 2 * 128 * 2);
  CHECK(r.predicted_ms > 0);
}

TEST_CASE("simulate: per-head tiles load G times the K/V of group-centric ones; a tiny L2 re-reads it all") {
  Config c = small_cfg(8, 2, 64, 64, 32, 4);  // G = 4
  an::SelectionSpec sp;
  sp.kind = "random", sp.T = 600, sp.Hkv = 2, sp.seed = 9;
  const an::Selection s = an::draw_selection(c, sp);
  an::SimOptions o;
  o.gpu = gpu_with(64 << 20);
  o.sample = 1, o.reuse_sample = -1;
  o.schedule.tile_positions = 4;
  const double group = kv_l2(branch(an::simulate(c, s, o), an::Branch::Slc));
  CHECK(group == query_centric_kv_bytes(c, s, 4, 4, 2));
  o.schedule.tile_heads = 1;
  const double head = kv_l2(branch(an::simulate(c, s, o), an::Branch::Slc));
  CHECK(head == 4 * group);
  // A CTA's two tiles sharing one union: the requests of tiles of 2 x 4 positions.
  o.schedule.tile_heads = 0, o.schedule.cta_union = true;
  CHECK(kv_l2(branch(an::simulate(c, s, o), an::Branch::Slc)) == query_centric_kv_bytes(c, s, 8, 4, 2));
  // The CTA order changes what the L2 sees, not what the tiles ask for.
  o.schedule.cta_union = false, o.schedule.order = an::TileOrder::PositionMajor;
  CHECK(kv_l2(branch(an::simulate(c, s, o), an::Branch::Slc)) == group);
  o.schedule.order = an::TileOrder::GroupMajor;
  // An L2 of one line and one tile at a time: K and V rows alternate, so every K/V request misses.
  o.schedule.tile_heads = 0, o.schedule.sms = 1, o.schedule.ctas_per_sm = 1, o.schedule.tiles_per_cta = 1;
  o.gpu = gpu_with(128, 1);
  const an::BranchResult tiny_l2 = branch(an::simulate(c, s, o), an::Branch::Slc);
  CHECK(kv_hbm(tiny_l2) == kv_l2(tiny_l2));
}

TEST_CASE("simulate: block-centric loads each selected block once per group and chunk of positions") {
  Config c = small_cfg(4, 1, 64, 64, 32, 4);
  an::SelectionSpec sp;
  sp.kind = "random", sp.T = 500, sp.Hkv = 1, sp.seed = 2;
  const an::Selection s = an::draw_selection(c, sp);
  an::SimOptions o;
  o.gpu = gpu_with(64 << 20);
  o.sample = 1, o.reuse_sample = -1;
  o.schedule.kind = an::ScheduleKind::BlockCentric;
  o.schedule.block_positions = 1000;  // one CTA per selected block
  const an::BranchResult r = branch(an::simulate(c, s, o), an::Branch::Slc);
  // Block j is loaded up to the last position that selected it.
  std::vector<int64_t> last(16, -1);
  int64_t pairs = 0;
  for (int64_t t = 0; t < 500; ++t)
    for (int64_t m = 0; m < 4; ++m) {
      const int32_t j = s.block_idx.data()[t * 4 + m];
      if (j >= 0) last[size_t(j)] = t, ++pairs;
    }
  double rows = 0;
  int64_t blocks = 0;
  for (int64_t j = 0; j < 16; ++j)
    if (last[size_t(j)] >= 0) rows += double(std::min<int64_t>((j + 1) * 32, last[size_t(j)] + 1) - j * 32), ++blocks;
  CHECK(kv_l2(r) == rows * 2 * 128);
  CHECK(r.kv_block_loads == blocks);
  CHECK(r.ctas == blocks);
  // q is read once per (position, selected block); partials written once and read once by the combine.
  CHECK(r.streams[int(an::Stream::Q)].l2_read_bytes == double(pairs) * 4 * 64 * 2);
  CHECK(r.streams[int(an::Stream::Partial)].l2_write_bytes == double(pairs) * 4 * (64 * 4 + 8));
  CHECK(r.streams[int(an::Stream::Partial)].l2_read_bytes == double(pairs) * 4 * (64 * 4 + 8));
}

TEST_CASE("simulate: compression and window branches read what their tiles see") {
  Config c = small_cfg(16, 1, 64, 64, 16, 4);  // G = 16: tiles of 8 positions
  c.cmp_len = 32, c.cmp_stride = 16, c.window = 64;
  an::SelectionSpec sp;
  sp.kind = "random", sp.T = 256, sp.Hkv = 1;
  const an::Selection s = an::draw_selection(c, sp);
  an::SimOptions o;
  o.gpu = gpu_with(64 << 20);
  o.sample = 1, o.reuse_sample = -1;
  o.branches = {an::Branch::Cmp, an::Branch::Win};
  const an::SimResult res = an::simulate(c, s, o);
  double kc_rows = 0, win_rows = 0;
  for (int64_t t0 = 0; t0 < 256; t0 += 8) {
    kc_rows += double(c.cmp_visible(t0 + 7));
    win_rows += double(t0 + 8 - c.win_start(t0));
  }
  const an::BranchResult& cmp = branch(res, an::Branch::Cmp);
  CHECK(cmp.streams[int(an::Stream::Kc)].l2_read_bytes == 2 * kc_rows * 128);  // two passes
  CHECK(cmp.streams[int(an::Stream::Vc)].l2_read_bytes == kc_rows * 128);
  CHECK(cmp.streams[int(an::Stream::Kc)].hbm_read_bytes == double(c.num_cmp_blocks(256)) * 128);
  const an::BranchResult& win = branch(res, an::Branch::Win);
  CHECK(win.streams[int(an::Stream::K)].l2_read_bytes == win_rows * 128);
  CHECK(win.streams[int(an::Stream::K)].hbm_read_bytes == 256.0 * 128);
}

TEST_CASE("simulate: the kernel's CTAs per SM and refusals") {
  Config c = small_cfg(64, 4, 128, 128, 64, 16);
  an::Schedule s;
  // Two warps of 2 x 32 x 256 x 2 B + 16 x 16 x 4 B, plus 1 KiB reserved: 68,608 B; 3 fit in 228 KiB.
  CHECK(an::kernel_ctas_per_sm(c, s, an::gpu_preset("h200"), 2) == 3);
  CHECK(an::kernel_ctas_per_sm(c, s, an::gpu_preset("a100"), 2) == 2);
  CHECK_THROWS_WITH_AS(an::gpu_preset("v100"), doctest::Contains("is not one of: h200, h100, a100, b200"), ConfigError);
  CHECK_THROWS_WITH_AS(an::parse_schedule("tile"), doctest::Contains("is not one of: query, block"), ConfigError);
  an::CacheSpec bad = tiny(1, 2);
  bad.line_bytes = 100;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("cache line size = 100 B"), ConfigError);
}
