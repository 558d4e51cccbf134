#include "npy.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <type_traits>

namespace nsa {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "float64";
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
  }
  return "?";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  return 0;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float v;
  if (exp == 0)
    v = std::ldexp(static_cast<float>(mant), -24);  // zero and subnormals
  else if (exp == 31)
    v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    v = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& what) {
  throw InputError(cat(name, ": ", what));
}

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False,
// 'shape': (3, 4), }. We read the three keys numpy always writes and nothing else.
std::string dict_value(const std::string& header, const std::string& key, const std::string& name) {
  const std::string k1 = "'" + key + "'", k2 = "\"" + key + "\"";
  size_t p = header.find(k1);
  size_t klen = k1.size();
  if (p == std::string::npos) {
    p = header.find(k2);
    klen = k2.size();
  }
  if (p == std::string::npos) {
    std::string shown = header.substr(0, 200);
    while (!shown.empty() && (shown.back() == ' ' || shown.back() == '\n')) shown.pop_back();
    bad(name, cat("header has no '", key, "' field: ", shown, header.size() > 200 ? " ..." : ""));
  }
  p = header.find(':', p + klen);
  if (p == std::string::npos) bad(name, cat("header field '", key, "' has no value"));
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  if (p >= header.size()) bad(name, cat("header field '", key, "' has no value"));
  size_t e;
  if (header[p] == '(') {
    e = header.find(')', p);
    if (e == std::string::npos) bad(name, "header 'shape' is not a closed tuple");
    return header.substr(p, e - p + 1);
  }
  if (header[p] == '\'' || header[p] == '"') {
    e = header.find(header[p], p + 1);
    if (e == std::string::npos) bad(name, cat("header field '", key, "' is not a closed string"));
    return header.substr(p + 1, e - p - 1);
  }
  e = header.find_first_of(",}", p);
  if (e == std::string::npos) bad(name, cat("header field '", key, "' is not terminated"));
  std::string v = header.substr(p, e - p);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

DType parse_descr(const std::string& d, const std::string& name) {
  if (d.size() < 2) bad(name, cat("unsupported dtype '", d, "'"));
  const char order = d[0];
  const std::string code = d.substr(1);
  if (order == '>' && code != "i1" && code != "u1")
    bad(name, cat("big-endian data ('", d,
                  "') is not supported; save it little-endian, e.g. a.astype(a.dtype.newbyteorder('<'))"));
  if (order != '<' && order != '|' && order != '=')
    bad(name, cat("unsupported dtype '", d, "'"));
  if (code == "f8") return DType::F64;
  if (code == "f4") return DType::F32;
  if (code == "f2") return DType::F16;
  if (code == "i4") return DType::I32;
  if (code == "i8") return DType::I64;
  bad(name, cat("unsupported dtype '", d,
                "'; expected float64, float32, float16, int32 or int64 (bf16 tensors: save as float32)"));
}

Shape parse_shape(const std::string& s, const std::string& name) {
  // "(3, 4)", "(5,)", "()"
  Shape shape;
  if (s.size() < 2 || s.front() != '(' || s.back() != ')') bad(name, cat("bad shape '", s, "'"));
  std::string body = s.substr(1, s.size() - 2);
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \tL");
    if (a == std::string::npos) continue;  // the empty item after a trailing comma
    std::string num = item.substr(a, b - a + 1);
    if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos)
      bad(name, cat("bad shape '", s, "': '", num, "' is not a non-negative integer"));
    if (num.size() > 15) bad(name, cat("bad shape '", s, "': dimension too large"));
    shape.push_back(std::stoll(num));
  }
  return shape;
}

}  // namespace

namespace {

// Magic, version and header length: where the header dict starts and how long it is.
struct Preamble {
  size_t offset, header_len;
};

constexpr size_t kPreambleMax = 12;  // version 2.0 and 3.0; version 1.0 has 10 bytes

// `size` bytes of the file's start are in `data` (at least min(file_size, kPreambleMax)).
Preamble parse_preamble(const char* data, size_t size, size_t file_size, const std::string& name) {
  static const char magic[] = "\x93NUMPY";
  if (size < 10 || std::memcmp(data, magic, 6) != 0)
    bad(name, "not a .npy file (the magic string \\x93NUMPY is missing)");
  const int major = static_cast<unsigned char>(data[6]);
  Preamble p{};
  if (major == 1) {
    p.header_len = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
    p.offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) bad(name, "truncated .npy header");
    p.header_len = 0;
    for (int i = 0; i < 4; ++i) p.header_len |= size_t(static_cast<unsigned char>(data[8 + i])) << (8 * i);
    p.offset = 12;
  } else {
    bad(name, cat("unsupported .npy format version ", major, "; expected 1, 2 or 3"));
  }
  if (p.header_len > file_size - p.offset)
    bad(name, cat("truncated .npy header (", p.header_len, " bytes announced, ", file_size - p.offset, " present)"));
  return p;
}

// The header dict, checked against the size of the file it heads.
NpyHeader parse_dict(const std::string& header, const Preamble& p, size_t file_size, const std::string& name) {
  NpyHeader h;
  h.dtype = parse_descr(dict_value(header, "descr", name), name);
  const std::string fortran = dict_value(header, "fortran_order", name);
  if (fortran == "True")
    bad(name, "Fortran-order data is not supported; save a C-order array (np.ascontiguousarray)");
  if (fortran != "False") bad(name, cat("bad 'fortran_order' value '", fortran, "'"));
  h.shape = parse_shape(dict_value(header, "shape", name), name);
  // Count the elements with overflow checks: nothing is allocated from these numbers before they
  // have been checked against the file's size. The dims other than 0 must multiply to at most
  // kMaxElements, whatever the dtype and the order of the dims (a 0 anywhere makes the array
  // empty, but the rest must still be countable): so numel() never overflows, and every shape
  // this reader accepts is one its writer can write back in any dtype (the fuzzer found a
  // [1e11, 6151, 6151, 0, 1000] int32 file whose int64 copy was refused).
  constexpr uint64_t kMaxElements = uint64_t(1) << 60;
  uint64_t nonzero = 1;
  bool empty = false;
  for (int64_t d : h.shape) {
    if (d == 0) {
      empty = true;
      continue;
    }
    if (nonzero > kMaxElements / static_cast<uint64_t>(d))
      bad(name, cat("shape ", shape_str(h.shape), " is too large (more than 2^60 elements)"));
    nonzero *= static_cast<uint64_t>(d);
  }
  h.data_offset = p.offset + p.header_len;
  h.data_bytes = static_cast<size_t>(empty ? 0 : nonzero) * static_cast<size_t>(dtype_size(h.dtype));
  const size_t have = file_size - h.data_offset;
  if (have < h.data_bytes)
    bad(name, cat("truncated data: shape ", shape_str(h.shape), " of ", dtype_name(h.dtype), " needs ", h.data_bytes,
                  " bytes, the file holds ", have));
  if (have > h.data_bytes)
    bad(name, cat("corrupted file: ", have - h.data_bytes, " bytes beyond the data that shape ", shape_str(h.shape),
                  " of ", dtype_name(h.dtype), " holds"));
  return h;
}

// Opens `path` for reading and returns its size; a folder or a missing file is named as such.
size_t open_file(const std::string& path, std::ifstream& f) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st))
    throw InputError(cat(path, ": cannot open file (", ec ? ec.message() : "No such file or directory", ")"));
  if (fs::is_directory(st)) throw InputError(cat(path, ": is a folder, expected a .npy file"));
  if (!fs::is_regular_file(st)) throw InputError(cat(path, ": not a regular file, expected a .npy file"));
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) throw InputError(cat(path, ": cannot read the file size (", ec.message(), ")"));
  f.open(path, std::ios::binary);
  if (!f) throw InputError(cat(path, ": cannot open file (", std::strerror(errno), ")"));
  return static_cast<size_t>(size);
}

// Reads `n` bytes at the stream's position into `out`.
void read_exact(std::ifstream& f, char* out, size_t n, const std::string& path) {
  if (n > 0 && !f.read(out, static_cast<std::streamsize>(n)))
    throw InputError(cat(path, ": read failed (the file changed while it was read?)"));
}

NpyHeader read_header(const std::string& path, std::ifstream& f) {
  const size_t file_size = open_file(path, f);
  std::string head(std::min(file_size, kPreambleMax), '\0');
  read_exact(f, &head[0], head.size(), path);
  const Preamble p = parse_preamble(head.data(), head.size(), file_size, path);
  // The preamble is checked: header_len fits in the file, so this allocation is bounded by it.
  std::string dict(p.header_len, '\0');
  f.seekg(static_cast<std::streamoff>(p.offset));
  read_exact(f, &dict[0], dict.size(), path);
  return parse_dict(dict, p, file_size, path);
}

}  // namespace

NpyArray parse_npy(const char* data, size_t size, const std::string& name) {
  const Preamble p = parse_preamble(data, size, size, name);
  const NpyHeader h = parse_dict(std::string(data + p.offset, p.header_len), p, size, name);
  NpyArray a;
  a.dtype = h.dtype;
  a.shape = h.shape;
  a.bytes.assign(data + h.data_offset, data + h.data_offset + h.data_bytes);
  return a;
}

NpyHeader read_npy_header(const std::string& path) {
  std::ifstream f;
  return read_header(path, f);
}

NpyArray read_npy(const std::string& path) {
  std::ifstream f;
  const NpyHeader h = read_header(path, f);
  NpyArray a;
  a.dtype = h.dtype;
  a.shape = h.shape;
  a.bytes.resize(h.data_bytes);
  f.seekg(static_cast<std::streamoff>(h.data_offset));
  read_exact(f, a.bytes.data(), h.data_bytes, path);
  return a;
}

namespace {

// One element of the file as T. Narrowing is defined for every value, so that no file can make
// the conversion undefined behaviour: float64 beyond float's range becomes +-inf (what IEEE
// rounding gives), and an int64 beyond int32's range is refused.
template <class T, class Src>
T narrow(Src s, size_t i, const NpyArray& a, const std::string& name) {
  if constexpr (std::is_floating_point<T>::value && std::is_floating_point<Src>::value && sizeof(T) < sizeof(Src)) {
    if (std::isfinite(s) && std::abs(s) > static_cast<Src>(std::numeric_limits<T>::max()))
      return std::copysign(std::numeric_limits<T>::infinity(), static_cast<T>(s > 0 ? 1 : -1));
  } else if constexpr (std::is_integral<T>::value && sizeof(T) < sizeof(Src)) {
    if (s < static_cast<Src>(std::numeric_limits<T>::min()) || s > static_cast<Src>(std::numeric_limits<T>::max()))
      throw InputError(cat(name, ": value ", s, " at index ", index_str(a.shape, int64_t(i)), " does not fit in ",
                           sizeof(T) == 4 ? "int32" : "the integer type expected"));
  }
  return static_cast<T>(s);
}

template <class T, class Src>
void convert(const NpyArray& a, AlignedVector<T>& out, const std::string& name) {
  const size_t n = out.size();
  for (size_t i = 0; i < n; ++i) {
    Src s;
    std::memcpy(&s, a.bytes.data() + i * sizeof(Src), sizeof(Src));
    out[i] = narrow<T, Src>(s, i, a, name);
  }
}

}  // namespace

template <class T>
Tensor<T> npy_to_tensor(const NpyArray& a, const std::string& name) {
  constexpr bool want_float = std::is_floating_point<T>::value;
  const bool is_float = a.dtype == DType::F64 || a.dtype == DType::F32 || a.dtype == DType::F16;
  if (want_float != is_float)
    throw InputError(cat(name, ": dtype ", dtype_name(a.dtype), " where ",
                         want_float ? "a floating-point tensor (float64, float32 or float16)"
                                    : "an integer tensor (int32 or int64)",
                         " is expected"));
  const size_t count = static_cast<size_t>(numel(a.shape));
  if (a.bytes.size() != count * static_cast<size_t>(dtype_size(a.dtype)))
    throw InputError(cat(name, ": ", a.bytes.size(), " data bytes for shape ", shape_str(a.shape), " of ",
                         dtype_name(a.dtype)));
  AlignedVector<T> out(count);
  switch (a.dtype) {
    case DType::F64: convert<T, double>(a, out, name); break;
    case DType::F32: convert<T, float>(a, out, name); break;
    case DType::F16:
      for (size_t i = 0; i < out.size(); ++i) {
        uint16_t h;
        std::memcpy(&h, a.bytes.data() + 2 * i, 2);
        out[i] = static_cast<T>(half_to_float(h));
      }
      break;
    case DType::I32: convert<T, int32_t>(a, out, name); break;
    case DType::I64: convert<T, int64_t>(a, out, name); break;
  }
  return Tensor<T>(a.shape, std::move(out));
}

namespace {
template <class T> const char* descr();
template <> const char* descr<double>() { return "<f8"; }
template <> const char* descr<float>() { return "<f4"; }
template <> const char* descr<int32_t>() { return "<i4"; }
template <> const char* descr<int64_t>() { return "<i8"; }
}  // namespace

template <class T>
std::string npy_header_bytes(const Shape& dims) {
  std::string shape = "(";
  for (size_t i = 0; i < dims.size(); ++i) shape += std::to_string(dims[i]) + ", ";
  if (dims.size() > 1) shape.resize(shape.size() - 2);
  if (dims.size() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = cat("{'descr': '", descr<T>(), "', 'fortran_order': False, 'shape': ", shape, ", }");
  // Pad with spaces so that the data starts on a 64-byte boundary, newline last (format spec).
  const bool v2 = header.size() + 11 > 65535;
  const size_t pre = v2 ? 12 : 10;
  const size_t total = ((pre + header.size() + 1 + 63) / 64) * 64;
  header.append(total - pre - header.size() - 1, ' ');
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(v2 ? 2 : 1);
  out += '\0';
  const size_t hl = header.size();
  out += static_cast<char>(hl & 0xff);
  out += static_cast<char>((hl >> 8) & 0xff);
  if (v2) {
    out += static_cast<char>((hl >> 16) & 0xff);
    out += static_cast<char>((hl >> 24) & 0xff);
  }
  return out + header;
}

template <class T>
std::string npy_bytes(const Tensor<T>& t) {
  std::string out = npy_header_bytes<T>(t.shape());
  out.append(reinterpret_cast<const char*>(t.data()), static_cast<size_t>(t.numel()) * sizeof(T));
  return out;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = cat(path, ".tmp-", ::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw InputError(cat(path, ": cannot create file (", std::strerror(errno), ")"));
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    if (!f) {
      std::remove(tmp.c_str());
      throw InputError(cat(path, ": write failed (disk full?)"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw InputError(cat(path, ": cannot rename temporary file into place (", std::strerror(errno), ")"));
  }
}

template <class T>
void save_npy(const std::string& path, const Tensor<T>& t) {
  write_file_atomic(path, npy_bytes(t));
}

#define NSA_NPY_INSTANTIATE(T)                                                  \
  template Tensor<T> npy_to_tensor<T>(const NpyArray&, const std::string&); \
  template std::string npy_header_bytes<T>(const Shape&);                   \
  template std::string npy_bytes<T>(const Tensor<T>&);                      \
  template void save_npy<T>(const std::string&, const Tensor<T>&);
NSA_NPY_INSTANTIATE(double)
NSA_NPY_INSTANTIATE(float)
NSA_NPY_INSTANTIATE(int32_t)
NSA_NPY_INSTANTIATE(int64_t)
#undef NSA_NPY_INSTANTIATE

}  // namespace nsa
