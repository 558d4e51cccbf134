// Errors: one header for the whole project (STYLE 7).
//
// Host failures throw one of the typed exceptions below; the `nsa` command catches `nsa::Error`
// and turns it into one line on stderr and a non-zero exit. Messages name the file, the field or
// the value, and what was expected, so a user can fix the input without reading code.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace nsa {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A configuration field out of range ("cmp_stride (d) = 40 must be <= cmp_len (l) = 32").
struct ConfigError : Error {
  using Error::Error;
};
// A file or tensor that cannot be used (missing, malformed, wrong dtype or shape, NaN).
struct InputError : Error {
  using Error::Error;
};
// A request that would exceed what the machine has (memory), refused before allocating.
struct ResourceError : Error {
  using Error::Error;
};
// A failure reported by the CUDA runtime or a library on the device.
struct CudaError : Error {
  using Error::Error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <class A, class... Rest>
void append(std::ostringstream& os, A&& a, Rest&&... rest) {
  os << std::forward<A>(a);
  append(os, std::forward<Rest>(rest)...);
}
}  // namespace detail

// cat("x = ", 3, " must be > 0") -> "x = 3 must be > 0": builds messages without boilerplate.
template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  detail::append(os, std::forward<Args>(args)...);
  return os.str();
}

// A number for a message: NaN as "nan" whatever its sign bit (printf would say "-nan").
inline std::string value_str(double x) { return x != x ? std::string("nan") : cat(x); }

}  // namespace nsa
