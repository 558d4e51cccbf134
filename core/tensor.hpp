// Tensor: one owning, contiguous, row-major (C order) array with a shape, the project's one
// container for inputs, intermediates and outputs (STYLE 2). It is what `.npy` files hold, so
// reading and writing them is a copy of bytes. Kernels take `data()` plus the shape; nothing
// here depends on Eigen or CUDA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include "errors.hpp"

namespace nsa {

using Shape = std::vector<int64_t>;

// Tensor storage starts on a 64-byte boundary (a cache line, an AVX-512 vector). Eigen peels
// unaligned heads off vectorised loops and small products by the address it is given, so with
// malloc's varying alignment the same computation could round differently from run to run.
template <class T, std::size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) {}
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(Align))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(Align)); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
  friend bool operator!=(const AlignedAllocator&, const AlignedAllocator&) { return false; }
};
template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

inline int64_t numel(const Shape& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

inline std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The multi-index of flat position `flat` (C order) in `shape`, as "[i, j, k]": names the
// position of a bad value in messages.
inline std::string index_str(const Shape& shape, int64_t flat) {
  Shape idx(shape.size());
  for (size_t a = shape.size(); a-- > 0;) {
    idx[a] = shape[a] ? flat % shape[a] : 0;
    flat = shape[a] ? flat / shape[a] : 0;
  }
  return shape_str(idx);
}

template <class T>
class Tensor {
 public:
  using value_type = T;

  Tensor() = default;
  explicit Tensor(Shape shape, T fill = T(0)) : shape_(std::move(shape)) {
    for (int64_t d : shape_)
      if (d < 0) throw Error(cat("tensor dimension ", d, " < 0 in shape ", shape_str(shape_)));
    data_.assign(static_cast<size_t>(nsa::numel(shape_)), fill);
  }
  Tensor(Shape shape, AlignedVector<T> data) : shape_(std::move(shape)), data_(std::move(data)) {
    if (static_cast<int64_t>(data_.size()) != nsa::numel(shape_))
      throw Error(cat("tensor of shape ", shape_str(shape_), " given ", data_.size(), " values"));
  }
  Tensor(Shape shape, const std::vector<T>& data) : Tensor(std::move(shape), AlignedVector<T>(data.begin(), data.end())) {}
  Tensor(Shape shape, std::initializer_list<T> data) : Tensor(std::move(shape), AlignedVector<T>(data)) {}

  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(static_cast<size_t>(i < 0 ? i + rank() : i)); }
  int64_t numel() const { return static_cast<int64_t>(data_.size()); }
  // "Not given" (default-constructed). A rank-0 scalar or a [0, H, D] tensor is not empty.
  bool empty() const { return shape_.empty() && data_.empty(); }

  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  AlignedVector<T>& vec() { return data_; }
  const AlignedVector<T>& vec() const { return data_; }
  T& operator[](int64_t i) { return data_[static_cast<size_t>(i)]; }
  const T& operator[](int64_t i) const { return data_[static_cast<size_t>(i)]; }

  // Row-major element access for the ranks the project uses.
  T& operator()(int64_t i, int64_t j) { return data_[static_cast<size_t>(i * shape_[1] + j)]; }
  const T& operator()(int64_t i, int64_t j) const {
    return data_[static_cast<size_t>(i * shape_[1] + j)];
  }
  T& operator()(int64_t i, int64_t j, int64_t k) {
    return data_[static_cast<size_t>((i * shape_[1] + j) * shape_[2] + k)];
  }
  const T& operator()(int64_t i, int64_t j, int64_t k) const {
    return data_[static_cast<size_t>((i * shape_[1] + j) * shape_[2] + k)];
  }
  // Pointer to the innermost row at (i, j) of a rank-3 tensor: `[i, j, :]`.
  T* row(int64_t i, int64_t j) { return data() + (i * shape_[1] + j) * shape_[2]; }
  const T* row(int64_t i, int64_t j) const { return data() + (i * shape_[1] + j) * shape_[2]; }

  void fill(T v) { std::fill(data_.begin(), data_.end(), v); }
  Tensor reshaped(Shape s) const& { return Tensor(std::move(s), data_); }
  Tensor reshaped(Shape s) && { return Tensor(std::move(s), std::move(data_)); }

  template <class U>
  Tensor<U> cast() const {
    if (empty()) return Tensor<U>();
    AlignedVector<U> out(data_.size());
    std::transform(data_.begin(), data_.end(), out.begin(), [](T x) { return static_cast<U>(x); });
    return Tensor<U>(shape_, std::move(out));
  }

 private:
  Shape shape_;
  AlignedVector<T> data_;
};

}  // namespace nsa
