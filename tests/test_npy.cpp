// .npy reader/writer: round trips, and every malformed file refused with a message naming it.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <cstring>
#include <string>

#include "npy.hpp"

using namespace nsa;

namespace {
std::string header(const std::string& dict, int version = 1) {
  std::string h = dict;
  const size_t pre = version == 1 ? 10 : 12;
  while ((pre + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::string out("\x93NUMPY", 6);
  out += char(version);
  out += '\0';
  out += char(h.size() & 0xff);
  out += char((h.size() >> 8) & 0xff);
  if (version > 1) out += std::string("\0\0", 2);
  return out + h;
}
template <class T>
std::string raw(std::initializer_list<T> v) {
  std::string s(v.size() * sizeof(T), '\0');
  std::memcpy(&s[0], std::data(v), s.size());
  return s;
}
NpyArray parse(const std::string& s) { return parse_npy(s.data(), s.size(), "x.npy"); }
std::string error_of(const std::string& s) {
  try {
    parse(s);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("npy round trip float64, float32, int32, int64 of several ranks") {
  Tensor<double> a({2, 3, 4});
  for (int64_t i = 0; i < a.numel(); ++i) a[i] = 0.5 * double(i) - 3.25;
  const std::string b = npy_bytes(a);
  CHECK(b.size() % 64 == a.numel() * 8 % 64);  // data starts on a 64-byte boundary
  const auto back = npy_to_tensor<double>(parse(b), "x");
  CHECK(back.shape() == a.shape());
  CHECK(back.vec() == a.vec());

  Tensor<int32_t> idx({5}, -1);
  idx[2] = 7;
  const auto bi = npy_to_tensor<int32_t>(parse(npy_bytes(idx)), "x");
  CHECK(bi.shape() == Shape{5});
  CHECK(bi[2] == 7);
  CHECK(bi[0] == -1);

  Tensor<float> scalar(Shape{});  // rank 0
  scalar[0] = 2.5f;
  const auto bs = npy_to_tensor<double>(parse(npy_bytes(scalar)), "x");
  CHECK(bs.rank() == 0);
  CHECK(bs[0] == 2.5);

  Tensor<int64_t> e({0, 3});  // empty, numel 0
  CHECK(npy_to_tensor<int64_t>(parse(npy_bytes(e)), "x").shape() == Shape{0, 3});
}

TEST_CASE("npy reads numpy's own headers: version 2, float16, '|' byte order, int64 to double refused") {
  const auto a = parse(header("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }", 2) +
                       raw<uint16_t>({0x3c00, 0xc000, 0x0001}));
  const auto t = npy_to_tensor<double>(a, "x");
  CHECK(t[0] == 1.0);
  CHECK(t[1] == -2.0);
  CHECK(t[2] == doctest::Approx(5.960464477539063e-08));  // smallest subnormal half
  CHECK(half_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_to_float(0x7e00)));
  const auto i = parse(header("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }") + raw<int64_t>({4, 5}));
  CHECK_THROWS_WITH_AS(npy_to_tensor<double>(i, "cu.npy"), doctest::Contains("cu.npy: dtype int64"), InputError);
  const auto f = parse(header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }") + raw<float>({1.f}));
  CHECK_THROWS_WITH_AS(npy_to_tensor<int32_t>(f, "idx.npy"), doctest::Contains("an integer tensor"), InputError);
}

TEST_CASE("npy refuses malformed files with the file name and the problem") {
  const std::string good = header("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }") +
                           raw<double>({1, 2, 3, 4});
  CHECK(error_of(good).empty());
  CHECK(error_of("hello world, not numpy") == "x.npy: not a .npy file (the magic string \\x93NUMPY is missing)");
  CHECK(error_of("") .find("not a .npy file") != std::string::npos);
  CHECK(error_of(good.substr(0, good.size() - 3)).find("truncated data") != std::string::npos);
  CHECK(error_of(good.substr(0, 40)).find("truncated .npy header") != std::string::npos);
  CHECK(error_of(good + "xx").find("corrupted file: 2 bytes beyond") != std::string::npos);
  CHECK(error_of(header("{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }") + raw<double>({1}))
            .find("big-endian") != std::string::npos);
  CHECK(error_of(header("{'descr': '<f8', 'fortran_order': True, 'shape': (1,), }") + raw<double>({1}))
            .find("Fortran-order") != std::string::npos);
  CHECK(error_of(header("{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }") + std::string(16, '\0'))
            .find("unsupported dtype '<c16'") != std::string::npos);
  CHECK(error_of(header("{'descr': '|b1', 'fortran_order': False, 'shape': (1,), }") + std::string(1, '\0'))
            .find("unsupported dtype") != std::string::npos);
  CHECK(error_of(header("{'descr': '<f8', 'shape': (1,), }") + raw<double>({1})).find("fortran_order") !=
        std::string::npos);
  CHECK(error_of(header("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }")).find("bad shape") !=
        std::string::npos);
  CHECK(error_of(header("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999), }"))
            .find("too large") != std::string::npos);
  std::string v9 = good;
  v9[6] = 9;
  CHECK(error_of(v9).find("unsupported .npy format version 9") != std::string::npos);
}

TEST_CASE("npy files on disk: save is atomic and load names a missing file") {
  const std::string path = "test_npy_roundtrip.npy";
  Tensor<float> t({3, 1}, 1.5f);
  save_npy(path, t);
  const auto back = load_npy<double>(path);
  CHECK(back.shape() == Shape{3, 1});
  CHECK(back[2] == 1.5);
  std::remove(path.c_str());
  CHECK_THROWS_WITH_AS(load_npy<double>("no/such/file.npy"), doctest::Contains("no/such/file.npy: cannot open file"),
                       InputError);
}

TEST_CASE("npy headers are read alone, checked against the file size, and nothing beyond the file is read") {
  const std::string path = "test_npy_header.npy";
  save_npy(path, Tensor<float>({4, 3}, 0.5f));
  const NpyHeader h = read_npy_header(path);
  CHECK(h.dtype == DType::F32);
  CHECK(h.shape == Shape{4, 3});
  CHECK(h.data_offset == 128);  // 10 bytes of preamble + a 60-character dict, padded to 64-byte blocks
  CHECK(h.data_bytes == 48);
  // A header announcing 10^12 floats over 48 bytes of data: refused from the header alone.
  {
    std::string bytes = header("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }") +
                        std::string(48, '\0');
    write_file_atomic(path, bytes);
  }
  CHECK_THROWS_WITH_AS(read_npy_header(path),
                       "test_npy_header.npy: truncated data: shape [1000000, 1000000] of float32 needs 4000000000000 "
                       "bytes, the file holds 48",
                       InputError);
  CHECK_THROWS_WITH_AS(read_npy(path), doctest::Contains("needs 4000000000000 bytes"), InputError);
  std::remove(path.c_str());
  CHECK_THROWS_WITH_AS(read_npy_header("."), ".: is a folder, expected a .npy file", InputError);
}

TEST_CASE("npy conversions are defined for every value: float64 beyond float is inf, int64 beyond int32 refused") {
  const auto f = parse(header("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }") +
                       raw<double>({1e300, -1e300, 2.5}));
  const auto t = npy_to_tensor<float>(f, "x");
  CHECK(t[0] == std::numeric_limits<float>::infinity());
  CHECK(t[1] == -std::numeric_limits<float>::infinity());
  CHECK(t[2] == 2.5f);
  const auto i = parse(header("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }") +
                       raw<int64_t>({1, 2, 3, int64_t(1) << 40}));
  CHECK(npy_to_tensor<int64_t>(i, "x")[3] == int64_t(1) << 40);
  CHECK_THROWS_WITH_AS(npy_to_tensor<int32_t>(i, "idx.npy"),
                       "idx.npy: value 1099511627776 at index [1, 1] does not fit in int32", InputError);
  // An array whose bytes do not match its shape (built by hand, not parsed) is refused.
  NpyArray bad{DType::F64, {4}, std::vector<char>(8)};
  CHECK_THROWS_WITH_AS(npy_to_tensor<double>(bad, "x"), "x: 8 data bytes for shape [4] of float64", InputError);
}

TEST_CASE("npy shapes with a 0 dim: the same verdict in every dtype and order") {
  // The fuzzer's finding: [1e11, 6151, 6151, 0, 1000] was accepted as int32 but refused as int64
  // (its byte count overflowed before the 0), so a file the reader accepted could not be written
  // back by its own writer. Now the dims other than 0 must multiply to at most 2^60 elements:
  // this shape (3.8e18) is refused in every dtype ...
  for (const char* d : {"<i4", "<i8", "<f2", "<f8"})
    CHECK(error_of(header(cat("{'descr': '", d, "', 'fortran_order': False, 'shape': (100000001018, 6151, 6151, 0, 1000), }")))
              .find("is too large (more than 2^60 elements)") != std::string::npos);
  // ... and an empty shape whose other dims are countable is accepted in every dtype and order,
  // and written back.
  for (const char* dims : {"(100000001018, 6151, 0, 1000)", "(0, 100000001018, 6151, 1000)"})
    for (const char* d : {"<i4", "<i8", "<f2", "<f8"}) {
      const auto a = parse(header(cat("{'descr': '", d, "', 'fortran_order': False, 'shape': ", dims, ", }")));
      CHECK(a.bytes.empty());
      CHECK(numel(a.shape) == 0);
      CHECK(parse(npy_bytes(npy_to_tensor<int64_t>(
                        parse(header(cat("{'descr': '<i8', 'fortran_order': False, 'shape': ", dims, ", }"))), "x")))
                .shape == a.shape);
    }
}
