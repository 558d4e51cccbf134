// Config validation: each bad field is named with its value and the allowed range.
#include <doctest/doctest.h>

#include "config.hpp"
#include "helpers.hpp"

using namespace nsa;

namespace {
std::string error_of(const Config& c) {
  try {
    c.validate();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("config: the paper's settings are valid and the derived counts follow the spec") {
  Config c;
  c.Hq = 64, c.Hkv = 4, c.dk = 192, c.dv = 128;
  CHECK(error_of(c).empty());
  CHECK(c.G() == 16);
  CHECK(c.softmax_scale() == doctest::Approx(1.0 / std::sqrt(192.0)));
  // Nc = (T - l)/d + 1 for T >= l, else 0.
  CHECK(c.num_cmp_blocks(31) == 0);
  CHECK(c.num_cmp_blocks(32) == 1);
  CHECK(c.num_cmp_blocks(47) == 1);
  CHECK(c.num_cmp_blocks(48) == 2);
  CHECK(c.num_cmp_blocks(65536) == 4095);
  // Query t sees block i iff i*d + l - 1 <= t.
  CHECK(c.cmp_visible(30) == 0);
  CHECK(c.cmp_visible(31) == 1);
  CHECK(c.cmp_visible(46) == 1);
  CHECK(c.cmp_visible(47) == 2);
  CHECK(c.num_slc_blocks(64) == 1);
  CHECK(c.num_slc_blocks(65) == 2);
  CHECK(c.slc_valid(63) == 1);
  CHECK(c.slc_valid(64) == 2);
  CHECK(c.win_start(511) == 0);
  CHECK(c.win_start(512) == 1);
}

TEST_CASE("config: every invalid field is named with its value and the expected range") {
  Config c = test::small_config();
  auto with = [&](auto mutate) {
    Config x = c;
    mutate(x);
    return error_of(x);
  };
  CHECK(with([](Config& x) { x.cmp_stride = 9; }) == "cmp_stride (d) = 9 is invalid: expected 1 <= d <= cmp_len (l) = 8");
  CHECK(with([](Config& x) { x.Hq = 5; }) == "Hq (query heads) = 5 is invalid: expected a multiple of Hkv = 2 (GQA groups)");
  CHECK(with([](Config& x) { x.slc_count = 2; }).find("slc_count (n) = 2 is invalid: expected >= init_blocks + local_blocks = 3") == 0);
  CHECK(with([](Config& x) { x.window = 0; }) == "window (w) = 0 is invalid: expected >= 1");
  CHECK(with([](Config& x) { x.cmp_len = -4; }) == "cmp_len (l) = -4 is invalid: expected >= 1");
  CHECK(with([](Config& x) { x.slc_len = 0; }) == "slc_len (l') = 0 is invalid: expected >= 1");
  CHECK(with([](Config& x) { x.dk = 0; }) == "dk (query/key head dim) = 0 is invalid: expected >= 1");
  CHECK(with([](Config& x) { x.init_blocks = -1; }) == "init_blocks = -1 is invalid: expected >= 0");
  CHECK(with([](Config& x) { x.scale = -1; }).find("scale = -1 is invalid") == 0);
  CHECK_THROWS_WITH_AS(parse_compress_kind("pool"), "compress = 'pool' is not one of: mean, linear, mlp", ConfigError);
}
