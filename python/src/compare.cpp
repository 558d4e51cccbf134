// nsa.compare's core: core/compare.hpp (the rules of `nsa compare`) on arrays.
#include "compare.hpp"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>

#include <optional>

#include "common.hpp"

namespace nsa::py {

namespace {

bool is_int(const AnyArray& a) { return a.dtype().code == uint8_t(nb::dlpack::dtype_code::Int); }

// Any CPU array of a float or int dtype, as double or int64 values (copied).
template <class T>
Tensor<T> values(const AnyArray& a, const std::string& name) {
  if (a.device_type() != nb::device::cpu::value) throw InputError(cat(name, ": compare takes CPU arrays"));
  Shape shape(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) shape[i] = int64_t(a.shape(i));
  Tensor<T> t(shape);
  const auto code = a.dtype().code;
  const int bits = a.dtype().bits;
  // Strided element access: the arrays compared may be views.
  std::vector<int64_t> idx(a.ndim(), 0);
  const char* base = static_cast<const char*>(a.data());
  const size_t isz = bits / 8;
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t off = 0;
    for (size_t d = 0; d < a.ndim(); ++d) off += idx[d] * a.stride(d);
    const char* p = base + off * int64_t(isz);
    double x = 0;
    if (code == uint8_t(nb::dlpack::dtype_code::Float) && bits == 64) x = *reinterpret_cast<const double*>(p);
    else if (code == uint8_t(nb::dlpack::dtype_code::Float) && bits == 32) x = *reinterpret_cast<const float*>(p);
    else if (code == uint8_t(nb::dlpack::dtype_code::Int) && bits == 64) x = double(*reinterpret_cast<const int64_t*>(p));
    else if (code == uint8_t(nb::dlpack::dtype_code::Int) && bits == 32) x = double(*reinterpret_cast<const int32_t*>(p));
    else throw InputError(cat(name, ": dtype (code ", int(code), ", ", bits, " bits) is not float64, float32, int64 or int32"));
    if constexpr (std::is_integral_v<T>)
      t[i] = code == uint8_t(nb::dlpack::dtype_code::Int) && bits == 64 ? *reinterpret_cast<const int64_t*>(p) : T(x);
    else
      t[i] = T(x);
    for (size_t d = a.ndim(); d-- > 0;) {
      if (++idx[d] < int64_t(a.shape(d))) break;
      idx[d] = 0;
    }
  }
  return t;
}

}  // namespace

void bind_compare(nb::module_& m) {
  m.def(
      "compare_arrays",
      [](const std::string& label, const AnyArray& a, const AnyArray& b, double rtol, double atol, double tie_tol,
         const std::string& metric, bool block_idx, std::optional<AnyArray> scores) {
        const CompareTolerance tol = make_compare_tolerance(rtol, atol, tie_tol, metric);
        Shape sa(a.ndim()), sb(b.ndim());
        for (size_t i = 0; i < a.ndim(); ++i) sa[i] = int64_t(a.shape(i));
        for (size_t i = 0; i < b.ndim(); ++i) sb[i] = int64_t(b.shape(i));
        CompareResult r;
        if (sa != sb) r = compare_shape_mismatch(label, sa, sb);
        else if (is_int(a) != is_int(b))
          r = compare_kind_mismatch(label, is_int(a) ? "int" : "float", is_int(b) ? "int" : "float");
        else if (!is_int(a)) r = compare_float(label, values<double>(a, "actual"), values<double>(b, "expected"), tol);
        else {
          Tensor<double> s;
          if (scores) s = values<double>(*scores, "block_scores");
          r = compare_int(label, values<int64_t>(a, "actual"), values<int64_t>(b, "expected"), tol, block_idx,
                          scores ? &s : nullptr);
        }
        return std::make_tuple(r.pass, r.line, r.max_abs, r.rel_l2);
      },
      nb::arg("label"), nb::arg("actual"), nb::arg("expected"), nb::arg("rtol"), nb::arg("atol"), nb::arg("tie_tol"),
      nb::arg("metric"), nb::arg("block_idx"), nb::arg("scores").none());
}

}  // namespace nsa::py
