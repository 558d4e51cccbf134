// Shared by the binding's translation units: arrays in (any DLPack / buffer-protocol array, checked
// and copied into the project's Tensor, which the reference owns), arrays out (a Tensor moved into
// a capsule and exposed as a NumPy array without a copy), and the Config from keyword settings.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <string>
#include <vector>

#include "config.hpp"
#include "decode.hpp"
#include "nsa_ref.hpp"

namespace nsa::py {

namespace nb = nanobind;
using AnyArray = nb::ndarray<nb::ro>;

template <class S>
const char* dtype_label();
template <>
inline const char* dtype_label<double>() { return "float64"; }
template <>
inline const char* dtype_label<float>() { return "float32"; }
template <>
inline const char* dtype_label<int64_t>() { return "int64"; }
template <>
inline const char* dtype_label<int32_t>() { return "int32"; }

// Copies a C-contiguous CPU array of exactly dtype S into a Tensor<S>. `name` is the argument's
// name in messages. Anything else is refused (TypeError / ValueError through the translator).
template <class S>
Tensor<S> to_tensor(const AnyArray& a, const std::string& name) {
  if (a.device_type() != nb::device::cpu::value)
    throw InputError(cat(name, ": on a device other than the CPU; the reference takes CPU arrays"));
  if (a.dtype() != nb::dtype<S>())
    throw InputError(cat(name, ": dtype code ", int(a.dtype().code), " bits ", int(a.dtype().bits), ", expected ",
                         dtype_label<S>()));
  Shape shape(a.ndim());
  int64_t expect = 1;
  bool contiguous = true;
  for (size_t i = a.ndim(); i-- > 0;) {
    shape[i] = int64_t(a.shape(i));
    if (shape[i] > 1 && a.stride(i) != expect) contiguous = false;
    expect *= shape[i];
  }
  if (!contiguous && nsa::numel(shape) > 0) throw InputError(cat(name, ": not C-contiguous (strides in elements differ from a row-major copy)"));
  Tensor<S> t(shape);
  if (t.numel()) std::memcpy(t.data(), a.data(), size_t(t.numel()) * sizeof(S));
  return t;
}

// A Tensor moved to the heap, owned by a capsule, seen by NumPy without a copy. None if empty.
template <class T>
nb::object to_numpy(Tensor<T>&& t) {
  if (t.empty()) return nb::none();
  auto* h = new Tensor<T>(std::move(t));
  nb::capsule owner(h, [](void* p) noexcept { delete static_cast<Tensor<T>*>(p); });
  std::vector<size_t> shape(h->shape().begin(), h->shape().end());
  return nb::cast(nb::ndarray<nb::numpy, T>(h->data(), shape.size(), shape.data(), owner));
}
template <class T>
nb::object to_numpy(const Tensor<T>& t) {
  return to_numpy(Tensor<T>(t));
}

// The block settings (the `nsa` options without their dashes, '-' as '_') and head layout.
Config make_config(const nb::dict& settings, int64_t Hq, int64_t Hkv, int64_t dk, int64_t dv);

// Inputs from a dict of arrays named as the command's options: q, k, v, k_cmp, ..., gates,
// gate_x, gate_w, gate_b, gate_w0, gate_b0, and phi's parameters as their --compress-params files
// (pe_k, w1_k, ...). cu_seqlens is given separately. Missing phi parameters (drawn=true) are drawn
// from `seed` in double and rounded to S, as the command does.
template <class S>
ref::Inputs<S> make_inputs(const Config& cfg, const nb::dict& arrays, const std::vector<int64_t>& cu_seqlens,
                           const std::string& gate_act, uint64_t seed, bool allow_nonfinite);

// The forward result as a dict named as `nsa forward`'s files.
template <class S>
nb::dict forward_dict(ref::ForwardResult<S>&& r);
// The gradients as a dict named as `nsa backward`'s files.
template <class S>
nb::dict backward_dict(ref::BackwardResult<S>&& g);

// A decode step's outputs (reference/decode.hpp StepResult) as a dict, with `pos`.
template <class S>
nb::dict step_dict(ref::StepResult<S>&& r);

// phi's parameters named as their files, for the configured kind.
template <class S>
std::vector<std::pair<std::string, Tensor<S>*>> phi_fields(ref::CompressParams<S>& phi, CompressKind kind);

void bind_compare(nb::module_& m);
#ifdef NSA_WITH_CUDA
void bind_cuda(nb::module_& m);
#endif

}  // namespace nsa::py
