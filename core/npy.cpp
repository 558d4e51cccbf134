#include "npy.hpp"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

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
  if (p == std::string::npos) bad(name, cat("header has no '", key, "' field: ", header));
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

NpyArray parse_npy(const char* data, size_t size, const std::string& name) {
  static const char magic[] = "\x93NUMPY";
  if (size < 10 || std::memcmp(data, magic, 6) != 0)
    bad(name, "not a .npy file (the magic string \\x93NUMPY is missing)");
  const int major = static_cast<unsigned char>(data[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) bad(name, "truncated .npy header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= size_t(static_cast<unsigned char>(data[8 + i])) << (8 * i);
    offset = 12;
  } else {
    bad(name, cat("unsupported .npy format version ", major, "; expected 1, 2 or 3"));
  }
  if (header_len > size - offset) bad(name, cat("truncated .npy header (", header_len, " bytes announced, ",
                                                 size - offset, " present)"));
  const std::string header(data + offset, header_len);
  NpyArray a;
  a.dtype = parse_descr(dict_value(header, "descr", name), name);
  const std::string fortran = dict_value(header, "fortran_order", name);
  if (fortran == "True")
    bad(name, "Fortran-order data is not supported; save a C-order array (np.ascontiguousarray)");
  if (fortran != "False") bad(name, cat("bad 'fortran_order' value '", fortran, "'"));
  a.shape = parse_shape(dict_value(header, "shape", name), name);
  // Count the bytes with overflow checks before allocating anything.
  const size_t item = static_cast<size_t>(dtype_size(a.dtype));
  size_t count = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && count > std::numeric_limits<size_t>::max() / item / static_cast<size_t>(d))
      bad(name, cat("shape ", shape_str(a.shape), " is too large"));
    count *= static_cast<size_t>(d);
  }
  const size_t need = count * item, have = size - offset - header_len;
  if (have < need)
    bad(name, cat("truncated data: shape ", shape_str(a.shape), " of ", dtype_name(a.dtype), " needs ", need,
                  " bytes, the file holds ", have));
  if (have > need)
    bad(name, cat("corrupted file: ", have - need, " bytes beyond the data that shape ", shape_str(a.shape),
                  " of ", dtype_name(a.dtype), " holds"));
  a.bytes.assign(data + offset + header_len, data + offset + header_len + need);
  return a;
}

NpyArray read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(cat(path, ": cannot open file (", std::strerror(errno), ")"));
  f.seekg(0, std::ios::end);
  const std::streamoff n = f.tellg();
  if (n < 0) throw InputError(cat(path, ": cannot read file size (is it a folder?)"));
  f.seekg(0);
  std::vector<char> buf(static_cast<size_t>(n));
  if (n > 0 && !f.read(buf.data(), n)) throw InputError(cat(path, ": read failed"));
  return parse_npy(buf.data(), buf.size(), path);
}

namespace {
template <class T, class Src>
void convert(const NpyArray& a, AlignedVector<T>& out) {
  const size_t n = out.size();
  for (size_t i = 0; i < n; ++i) {
    Src s;
    std::memcpy(&s, a.bytes.data() + i * sizeof(Src), sizeof(Src));
    out[i] = static_cast<T>(s);
  }
}
}  // namespace

template <class T>
Tensor<T> npy_to_tensor(const NpyArray& a, const std::string& name) {
  AlignedVector<T> out(static_cast<size_t>(numel(a.shape)));
  constexpr bool want_float = std::is_floating_point<T>::value;
  const bool is_float = a.dtype == DType::F64 || a.dtype == DType::F32 || a.dtype == DType::F16;
  if (want_float != is_float)
    throw InputError(cat(name, ": dtype ", dtype_name(a.dtype), " where ",
                         want_float ? "a floating-point tensor (float64, float32 or float16)"
                                    : "an integer tensor (int32 or int64)",
                         " is expected"));
  switch (a.dtype) {
    case DType::F64: convert<T, double>(a, out); break;
    case DType::F32: convert<T, float>(a, out); break;
    case DType::F16:
      for (size_t i = 0; i < out.size(); ++i) {
        uint16_t h;
        std::memcpy(&h, a.bytes.data() + 2 * i, 2);
        out[i] = static_cast<T>(half_to_float(h));
      }
      break;
    case DType::I32: convert<T, int32_t>(a, out); break;
    case DType::I64: convert<T, int64_t>(a, out); break;
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
std::string npy_bytes(const Tensor<T>& t) {
  std::string shape = "(";
  for (size_t i = 0; i < t.shape().size(); ++i) shape += std::to_string(t.shape()[i]) + ", ";
  if (t.shape().size() > 1) shape.resize(shape.size() - 2);
  if (t.shape().size() == 1) shape.resize(shape.size() - 1);
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
  out += header;
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
  template std::string npy_bytes<T>(const Tensor<T>&);                      \
  template void save_npy<T>(const std::string&, const Tensor<T>&);
NSA_NPY_INSTANTIATE(double)
NSA_NPY_INSTANTIATE(float)
NSA_NPY_INSTANTIATE(int32_t)
NSA_NPY_INSTANTIATE(int64_t)
#undef NSA_NPY_INSTANTIATE

}  // namespace nsa
