// NumPy `.npy` files: the project's one tensor file format (docs/interface.md, "Files").
//
// Accepted: format versions 1.0, 2.0 and 3.0; little-endian (or byte-order-free) float64,
// float32, float16, int32, int64; C order; the data exactly as long as the shape says. Anything
// else is refused with an InputError that names the file and the problem; nothing is allocated
// before the header has been checked against the file's size, so a corrupt shape cannot make the
// reader ask for terabytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensor.hpp"

namespace nsa {

enum class DType { F64, F32, F16, I32, I64 };

const char* dtype_name(DType t);  // "float64", ...
int dtype_size(DType t);

// What a `.npy` header says, checked against the size of its file: the data is exactly
// `data_bytes` = numel(shape) * dtype_size(dtype) bytes, starting at `data_offset`.
struct NpyHeader {
  DType dtype = DType::F64;
  Shape shape;
  size_t data_offset = 0;  // magic, version, header length and header
  size_t data_bytes = 0;
};

// A parsed `.npy` file: its dtype, shape and raw little-endian bytes.
struct NpyArray {
  DType dtype = DType::F64;
  Shape shape;
  std::vector<char> bytes;  // numel(shape) * dtype_size(dtype) bytes, C order
};

// Parses a whole file held in memory. `name` is used in error messages (usually the path).
NpyArray parse_npy(const char* data, size_t size, const std::string& name);
// Reads the header only (a few hundred bytes), checked against the file's size: what the data
// would cost in memory is known before any of it is read.
NpyHeader read_npy_header(const std::string& path);
// Reads a file: the header first, then exactly the data it announces (never more than the file
// holds), straight into the array.
NpyArray read_npy(const std::string& path);

// Converts to T (a floating type, or int32/int64 for index files). Floating files convert to any
// floating T; integer files only to integer T, and floating files never to integer T.
template <class T>
Tensor<T> npy_to_tensor(const NpyArray& a, const std::string& name);

template <class T>
Tensor<T> load_npy(const std::string& path) {
  return npy_to_tensor<T>(read_npy(path), path);
}

// The header of a `.npy` file (format 1.0, or 2.0 when the header needs it) for a C-order array of
// T with this shape; the data follows it directly.
template <class T>
std::string npy_header_bytes(const Shape& shape);
// The bytes of a `.npy` file holding `t`: the header, then the data.
template <class T>
std::string npy_bytes(const Tensor<T>& t);

// Writes `t` to `path` atomically: a temporary file in the same folder, then a rename.
template <class T>
void save_npy(const std::string& path, const Tensor<T>& t);

// Writes bytes to `path` atomically (temporary name, then rename); throws InputError on failure.
void write_file_atomic(const std::string& path, const std::string& bytes);

// IEEE 754 binary16 -> float, exact (every half is representable as a float).
float half_to_float(uint16_t h);

}  // namespace nsa
