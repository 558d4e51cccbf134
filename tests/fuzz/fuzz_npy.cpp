// libFuzzer target for the .npy reader (core/npy.cpp), built by scripts/fuzz.sh with clang,
// AddressSanitizer and UndefinedBehaviorSanitizer. Every input must either parse or be refused
// with an InputError; anything else (a crash, a sanitizer report, another exception, a broken
// invariant) is a finding. What parses must also convert to each element type or be refused, and
// written back it must parse to the same shape and bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "npy.hpp"

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

template <class T>
void convert_and_round_trip(const nsa::NpyArray& a) {
  nsa::Tensor<T> t;
  try {
    t = nsa::npy_to_tensor<T>(a, "fuzz.npy");
  } catch (const nsa::InputError&) {
    return;  // refused with a message: a float file as integers, an int64 beyond int32
  }
  require(t.shape() == a.shape);
  const std::string bytes = nsa::npy_bytes(t);
  const nsa::NpyArray b = nsa::parse_npy(bytes.data(), bytes.size(), "round-trip.npy");
  require(b.shape == a.shape);
  require(b.bytes.size() == static_cast<size_t>(t.numel()) * sizeof(T));
  require(b.bytes.empty() || std::memcmp(b.bytes.data(), t.data(), b.bytes.size()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nsa::NpyArray a;
  try {
    a = nsa::parse_npy(reinterpret_cast<const char*>(data), size, "fuzz.npy");
  } catch (const nsa::InputError&) {
    return 0;
  }
  // A parsed array holds exactly the bytes its shape and dtype announce, within the input.
  require(a.bytes.size() == static_cast<size_t>(nsa::numel(a.shape)) * static_cast<size_t>(nsa::dtype_size(a.dtype)));
  require(a.bytes.size() <= size);
  for (int64_t d : a.shape) require(d >= 0);
  convert_and_round_trip<double>(a);
  convert_and_round_trip<float>(a);
  convert_and_round_trip<int64_t>(a);
  convert_and_round_trip<int32_t>(a);
  return 0;
}
