// SPDX-License-Identifier: Apache-2.0
/// \file npz.hpp
/// \brief NumPy .npz archives: npz_writer writes an uncompressed (STORED) ZIP of .npy arrays
/// atomically, npz_file reads and validates one, and write_samples_npz writes the file the ADM
/// FID evaluator reads (np.load(path)["arr_0"]: uint8 [N, H, W, C]; plus "labels": int64 [N]).
///
/// .npy (format 1.0 written; 1.0, 2.0 and 3.0 read): the magic "\x93NUMPY", the version, the
/// header length (little-endian u16, u32 from 2.0 on), a Python dict literal
/// "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }" padded with spaces and ended by a
/// newline so that the data starts at a multiple of 64 bytes, then the data in C order.
/// dtypes: '|u1' (uint8), '<i8' (int64), '<f4' (float32).
///
/// ZIP: local file headers with the data, a central directory and the end record; no ZIP64,
/// so an archive must stay below 4 GiB (the writer says so clearly). The reader accepts what
/// NumPy writes (np.savez, whose local headers carry ZIP64 size fields, and np.savez_compressed,
/// whose members are deflated) and checks signatures, sizes, offsets, names and CRC-32s.
#pragma once

#include <algorithm>
#include <bit>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <zlib.h>

#include "../core/error.hpp"
#include "atomic_file.hpp"

static_assert(std::endian::native == std::endian::little,
              "promoe/io/npz.hpp: .npy data is written and read in the host's byte order, which must be "
              "little-endian");

namespace promoe::io {

/// The .npy element types read and written.
enum class npy_dtype { u8, i64, f32 };

/// As NumPy spells it in a header: '|u1', '<i8', '<f4'.
constexpr std::string_view npy_descr(npy_dtype t) {
  switch (t) {
    case npy_dtype::u8: return "|u1";
    case npy_dtype::i64: return "<i8";
    case npy_dtype::f32: return "<f4";
  }
  return "?";
}

constexpr std::size_t npy_itemsize(npy_dtype t) {
  switch (t) {
    case npy_dtype::u8: return 1;
    case npy_dtype::i64: return 8;
    case npy_dtype::f32: return 4;
  }
  return 0;
}

/// One array of a .npz (or a .npy file): C order, little-endian bytes.
struct npy_array {
  npy_dtype type = npy_dtype::u8;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;

  std::int64_t numel() const { return static_cast<std::int64_t>(data.size() / npy_itemsize(type)); }

  /// The values: std::uint8_t reads '|u1'; std::int64_t reads '<i8' and '|u1'; float reads
  /// '<f4'; double reads '<f4'. Anything else is an error.
  template <class T>
  std::vector<T> values() const {
    static_assert(std::is_same_v<T, std::uint8_t> || std::is_same_v<T, std::int64_t> || std::is_same_v<T, float> ||
                      std::is_same_v<T, double>,
                  "npy_array::values<T>: T must be std::uint8_t, std::int64_t, float or double");
    std::vector<T> out(static_cast<std::size_t>(numel()));
    const auto copy_as = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < out.size(); ++i) {
        S s;
        std::memcpy(&s, data.data() + i * sizeof(S), sizeof(S));
        out[i] = static_cast<T>(s);
      }
    };
    if (std::is_same_v<T, std::uint8_t> && type == npy_dtype::u8) copy_as(std::uint8_t{});
    else if (std::is_same_v<T, std::int64_t> && type == npy_dtype::i64) copy_as(std::int64_t{});
    else if (std::is_same_v<T, std::int64_t> && type == npy_dtype::u8) copy_as(std::uint8_t{});
    else if (std::is_floating_point_v<T> && type == npy_dtype::f32) copy_as(float{});
    else fail("npy_array::values: the array's dtype is '", npy_descr(type), "', which this value type cannot read");
    return out;
  }
};

namespace detail {

inline constexpr std::uint32_t zip_local_sig = 0x04034b50;
inline constexpr std::uint32_t zip_central_sig = 0x02014b50;
inline constexpr std::uint32_t zip_end_sig = 0x06054b50;
inline constexpr std::uint32_t zip64_locator_sig = 0x07064b50;
inline constexpr std::uint16_t zip_dos_date = (0 << 9) | (1 << 5) | 1;  // 1980-01-01, the earliest DOS date

inline void put_le(std::vector<std::byte>& out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
}

inline std::uint64_t get_le(const std::byte* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}

inline std::uint32_t npz_crc32(std::uint32_t crc, const std::byte* p, std::size_t n) {
  uLong c = crc;
  while (n > 0) {
    const auto k = static_cast<uInt>(std::min<std::size_t>(n, 1u << 30));
    c = ::crc32(c, reinterpret_cast<const Bytef*>(p), k);
    p += k;
    n -= k;
  }
  return static_cast<std::uint32_t>(c);
}

/// numel(shape) * itemsize, or nullopt-like false on negative dimensions or overflow.
inline bool npy_byte_count(npy_dtype t, const std::vector<std::int64_t>& shape, std::uint64_t& bytes) {
  std::uint64_t n = npy_itemsize(t);
  bool zero = false, overflow = false;
  for (const std::int64_t d : shape) {
    if (d < 0) return false;
    if (d == 0) zero = true;
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) overflow = true;
    else n *= u;
  }
  if (zero) {
    bytes = 0;
    return true;
  }
  if (overflow) return false;
  bytes = n;
  return true;
}

/// The .npy 1.0 header (magic through the newline) for an array; its length is a multiple of 64.
inline std::string npy_header(npy_dtype t, const std::vector<std::int64_t>& shape) {
  std::string dict = "{'descr': '";
  dict += npy_descr(t);
  dict += "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) dict += ", ";
    dict += std::to_string(shape[i]);
  }
  if (shape.size() == 1) dict += ',';
  dict += "), }";
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  PROMOE_CHECK(dict.size() <= 0xffff, "npy header of ", dict.size(), " bytes is too long for format 1.0");
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>(dict.size() >> 8);
  return out + dict;
}

/// A restricted parser for the Python literal of a .npy header.
class npy_header_parser {
 public:
  npy_header_parser(std::string_view s, const std::string& what) : s_(s), what_(what) {}

  void parse(std::string& descr, bool& fortran, std::vector<std::int64_t>& shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    ws_();
    expect_('{');
    for (;;) {
      ws_();
      if (peek_() == '}') break;
      const std::string key = string_();
      ws_();
      expect_(':');
      ws_();
      if (key == "descr") {
        if (have_descr) bad_("'descr' appears twice");
        descr = string_();
        have_descr = true;
      } else if (key == "fortran_order") {
        if (have_fortran) bad_("'fortran_order' appears twice");
        fortran = boolean_();
        have_fortran = true;
      } else if (key == "shape") {
        if (have_shape) bad_("'shape' appears twice");
        shape = tuple_();
        have_shape = true;
      } else {
        bad_("unexpected key '", key, "'");
      }
      ws_();
      if (peek_() == ',') {
        ++i_;
        continue;
      }
      if (peek_() != '}') bad_("expected ',' or '}'");
    }
    ++i_;
    ws_();
    if (i_ != s_.size()) bad_("unexpected text after the dict");
    if (!have_descr || !have_fortran || !have_shape)
      bad_("the header must hold the keys 'descr', 'fortran_order' and 'shape'");
  }

 private:
  template <class... Args>
  [[noreturn]] void bad_(const Args&... args) const {
    fail(what_, ": invalid .npy header: ", args..., " (at header byte ", i_, ")");
  }
  char peek_() const {
    if (i_ >= s_.size()) bad_("unexpected end of the header");
    return s_[i_];
  }
  void ws_() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect_(char c) {
    if (peek_() != c) bad_("expected '", c, "'");
    ++i_;
  }
  std::string string_() {
    const char q = peek_();
    if (q != '\'' && q != '"') bad_("expected a string");
    ++i_;
    std::string out;
    while (peek_() != q) {
      if (s_[i_] == '\\') bad_("escape sequences are not supported");
      out += s_[i_++];
    }
    ++i_;
    return out;
  }
  bool boolean_() {
    if (s_.substr(i_, 4) == "True") {
      i_ += 4;
      return true;
    }
    if (s_.substr(i_, 5) == "False") {
      i_ += 5;
      return false;
    }
    bad_("expected True or False");
  }
  std::vector<std::int64_t> tuple_() {
    expect_('(');
    std::vector<std::int64_t> out;
    bool trailing_comma = false;
    for (;;) {
      ws_();
      if (peek_() == ')') break;
      if (peek_() < '0' || peek_() > '9') bad_("expected a non-negative integer in 'shape'");
      std::int64_t v = 0;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
        if (v > (std::numeric_limits<std::int64_t>::max() - 9) / 10) bad_("a dimension in 'shape' is too large");
        v = v * 10 + (s_[i_++] - '0');
      }
      if (out.size() >= 64) bad_("'shape' has more than 64 dimensions");
      out.push_back(v);
      trailing_comma = false;
      ws_();
      if (peek_() == ',') {
        ++i_;
        trailing_comma = true;
        continue;
      }
      if (peek_() != ')') bad_("expected ',' or ')' in 'shape'");
    }
    ++i_;
    if (out.size() == 1 && !trailing_comma) bad_("a one-element 'shape' needs a trailing comma");
    return out;
  }

  std::string_view s_;
  const std::string& what_;
  std::size_t i_ = 0;
};

/// Writes a whole archive through sink(const std::byte*, std::size_t).
struct npz_member {
  std::string name;  // in the archive, with ".npy"
  std::string header;
  std::vector<std::byte> data;
  std::uint32_t crc = 0;
  std::uint64_t size() const { return header.size() + data.size(); }
};

}  // namespace detail

/// A whole .npy file's bytes; data holds numel(shape) * itemsize bytes.
inline std::vector<std::byte> npy_bytes(npy_dtype t, const std::vector<std::int64_t>& shape, const void* data) {
  std::uint64_t bytes = 0;
  PROMOE_CHECK(detail::npy_byte_count(t, shape, bytes) && bytes <= std::numeric_limits<std::size_t>::max() / 2,
               "npy_bytes: invalid or too large shape ", ::promoe::detail::shape_string(shape));
  PROMOE_CHECK(bytes == 0 || data, "npy_bytes: data is null");
  const std::string h = detail::npy_header(t, shape);
  std::vector<std::byte> out(h.size() + bytes);
  std::memcpy(out.data(), h.data(), h.size());
  if (bytes) std::memcpy(out.data() + h.size(), data, static_cast<std::size_t>(bytes));
  return out;
}

/// Parses and validates a whole .npy file; what names it in messages.
inline npy_array parse_npy(std::span<const std::byte> b, const std::string& what) {
  if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0) fail(what, ": not a .npy array (no \\x93NUMPY magic)");
  const auto major = std::to_integer<unsigned>(b[6]);
  const auto minor = std::to_integer<unsigned>(b[7]);
  if (major < 1 || major > 3 || minor != 0) fail(what, ": unsupported .npy format version ", major, ".", minor);
  const std::size_t prefix = major == 1 ? 10 : 12;
  if (b.size() < prefix) fail(what, ": truncated .npy header");
  const std::uint64_t hlen = detail::get_le(b.data() + 8, major == 1 ? 2 : 4);
  if (hlen > b.size() - prefix)
    fail(what, ": truncated .npy file: the header declares ", hlen, " bytes, ", b.size() - prefix, " follow");
  const std::string_view text(reinterpret_cast<const char*>(b.data() + prefix), static_cast<std::size_t>(hlen));
  if (text.empty() || text.back() != '\n') fail(what, ": invalid .npy header: it does not end with a newline");
  std::string descr;
  bool fortran = false;
  npy_array out;
  detail::npy_header_parser(text, what).parse(descr, fortran, out.shape);
  if (descr == "|u1" || descr == "<u1") out.type = npy_dtype::u8;
  else if (descr == "<i8") out.type = npy_dtype::i64;
  else if (descr == "<f4") out.type = npy_dtype::f32;
  else fail(what, ": .npy dtype '", descr, "' is not supported (reads '|u1', '<i8' and '<f4')");
  std::size_t non_unit = 0;
  for (const auto d : out.shape) non_unit += d > 1;
  if (fortran && non_unit > 1) fail(what, ": Fortran-ordered .npy arrays are not supported");
  std::uint64_t bytes = 0;
  if (!detail::npy_byte_count(out.type, out.shape, bytes))
    fail(what, ": .npy shape ", ::promoe::detail::shape_string(out.shape), " is too large");
  const std::uint64_t have = b.size() - prefix - hlen;
  if (have != bytes)
    fail(what, ": .npy data has ", have, " bytes, shape ", ::promoe::detail::shape_string(out.shape), " of '", descr,
         "' needs ", bytes);
  out.data.assign(b.begin() + static_cast<std::ptrdiff_t>(prefix + hlen), b.end());
  return out;
}

/// Builds a .npz: arrays in the order added, each stored uncompressed as "<name>.npy".
class npz_writer {
 public:
  /// Copies numel(shape) * itemsize bytes from data.
  void add(const std::string& name, npy_dtype t, const std::vector<std::int64_t>& shape, const void* data) {
    PROMOE_CHECK(!name.empty() && name.size() <= 1000, "npz_writer::add: array name '", name,
                 "' must have 1 to 1000 characters");
    for (const char c : name)
      PROMOE_CHECK(c >= 0x20 && c < 0x7f && c != '/' && c != '\\', "npz_writer::add: array name '", name,
                   "' must be printable ASCII without '/' or '\\'");
    const std::string member = name + ".npy";
    for (const auto& m : members_)
      PROMOE_CHECK(m.name != member, "npz_writer::add: array '", name, "' was already added");
    for (const auto d : shape)
      PROMOE_CHECK(d >= 0, "npz_writer::add: array '", name, "' has a negative dimension in shape ",
                   ::promoe::detail::shape_string(shape));
    std::uint64_t bytes = 0;
    PROMOE_CHECK(detail::npy_byte_count(t, shape, bytes) && bytes < 0xffffffffu, "npz_writer::add: array '", name,
                 "' of shape ", ::promoe::detail::shape_string(shape), " has 4 GiB or more; ZIP64 is not supported");
    PROMOE_CHECK(bytes == 0 || data, "npz_writer::add: array '", name, "': data is null");
    detail::npz_member m;
    m.name = member;
    m.header = detail::npy_header(t, shape);
    m.data.resize(static_cast<std::size_t>(bytes));
    if (bytes) std::memcpy(m.data.data(), data, static_cast<std::size_t>(bytes));
    m.crc = detail::npz_crc32(0, reinterpret_cast<const std::byte*>(m.header.data()), m.header.size());
    m.crc = detail::npz_crc32(m.crc, m.data.data(), m.data.size());
    members_.push_back(std::move(m));
    (void)layout_("npz_writer::add");  // fail now if the archive outgrows 4 GiB
  }

  /// dtype from T: std::uint8_t '|u1', std::int64_t '<i8', float '<f4'; values.size() must
  /// match the shape.
  template <class T>
  void add(const std::string& name, const std::vector<std::int64_t>& shape, std::span<const T> values) {
    static_assert(std::is_same_v<T, std::uint8_t> || std::is_same_v<T, std::int64_t> || std::is_same_v<T, float>,
                  "npz_writer::add: T must be std::uint8_t, std::int64_t or float");
    constexpr npy_dtype t = std::is_same_v<T, std::uint8_t>   ? npy_dtype::u8
                            : std::is_same_v<T, std::int64_t> ? npy_dtype::i64
                                                              : npy_dtype::f32;
    std::uint64_t bytes = 0;
    const bool ok = detail::npy_byte_count(t, shape, bytes);
    PROMOE_CHECK(ok && values.size() * sizeof(T) == bytes, "npz_writer::add: array '", name, "': ", values.size(),
                 " values for shape ", ::promoe::detail::shape_string(shape));
    add(name, t, shape, values.data());
  }
  template <class T>
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const std::vector<T>& values) {
    add(name, shape, std::span<const T>(values));
  }

  /// The whole archive.
  std::vector<std::byte> bytes() const {
    std::vector<std::byte> out;
    out.reserve(static_cast<std::size_t>(layout_("npz_writer::bytes")));
    emit_([&](const std::byte* p, std::size_t n) { out.insert(out.end(), p, p + n); });
    return out;
  }

  /// Writes the archive atomically (temporary file in the same directory, fsync, rename);
  /// errors name the path.
  void write(const std::string& path) const {
    (void)layout_("npz_writer::write");
    write_file_atomically(path, "npz_writer::write", [&](detail::output_file& out) {
      emit_([&](const std::byte* p, std::size_t n) { out.write(p, n); });
    });
  }

 private:
  static constexpr std::uint64_t zip_limit = 0xffffffffu;  // a field at this value means ZIP64

  /// Total archive size, checking the ZIP (non-ZIP64) limits.
  std::uint64_t layout_(const char* who) const {
    PROMOE_CHECK(members_.size() < 0xffff, who, ": ", members_.size(), " arrays; ZIP64 is not supported");
    std::uint64_t offset = 0, central = 0;
    for (const auto& m : members_) {
      offset += 30 + m.name.size() + m.size();
      central += 46 + m.name.size();
    }
    const std::uint64_t total = offset + central + 22;
    PROMOE_CHECK(total < zip_limit, who, ": the archive would have ", total,
                 " bytes; archives of 4 GiB or more need ZIP64, which is not supported");
    return total;
  }

  template <class Sink>
  void emit_(Sink&& sink) const {
    std::vector<std::byte> central;
    std::uint64_t offset = 0;
    for (const auto& m : members_) {
      std::vector<std::byte> local;
      fixed_(local, detail::zip_local_sig, false, m);
      local.insert(local.end(), reinterpret_cast<const std::byte*>(m.name.data()),
                   reinterpret_cast<const std::byte*>(m.name.data()) + m.name.size());
      sink(local.data(), local.size());
      sink(reinterpret_cast<const std::byte*>(m.header.data()), m.header.size());
      sink(m.data.data(), m.data.size());
      fixed_(central, detail::zip_central_sig, true, m);
      detail::put_le(central, 0, 2);       // file comment length
      detail::put_le(central, 0, 2);       // disk number start
      detail::put_le(central, 0, 2);       // internal attributes
      detail::put_le(central, 0644u << 16, 4);  // external attributes: a regular file, rw-r--r--
      detail::put_le(central, offset, 4);  // local header offset
      central.insert(central.end(), reinterpret_cast<const std::byte*>(m.name.data()),
                     reinterpret_cast<const std::byte*>(m.name.data()) + m.name.size());
      offset += 30 + m.name.size() + m.size();
    }
    std::vector<std::byte> end;
    detail::put_le(end, detail::zip_end_sig, 4);
    detail::put_le(end, 0, 2);  // this disk
    detail::put_le(end, 0, 2);  // disk with the central directory
    detail::put_le(end, members_.size(), 2);
    detail::put_le(end, members_.size(), 2);
    detail::put_le(end, central.size(), 4);
    detail::put_le(end, offset, 4);
    detail::put_le(end, 0, 2);  // comment length
    sink(central.data(), central.size());
    sink(end.data(), end.size());
  }

  /// The fields local and central headers share (the central one has "version made by" too).
  static void fixed_(std::vector<std::byte>& out, std::uint32_t sig, bool central, const detail::npz_member& m) {
    detail::put_le(out, sig, 4);
    if (central) detail::put_le(out, (3u << 8) | 20u, 2);  // made by: Unix, ZIP 2.0
    detail::put_le(out, 20, 2);                             // version needed to extract: 2.0
    detail::put_le(out, 0, 2);                              // flags
    detail::put_le(out, 0, 2);                              // method: stored
    detail::put_le(out, 0, 2);                              // time 00:00:00
    detail::put_le(out, detail::zip_dos_date, 2);
    detail::put_le(out, m.crc, 4);
    detail::put_le(out, m.size(), 4);  // compressed size
    detail::put_le(out, m.size(), 4);  // uncompressed size
    detail::put_le(out, m.name.size(), 2);
    detail::put_le(out, 0, 2);  // extra field length
  }

  std::vector<detail::npz_member> members_;
};

/// Writes the samples file the ADM FID evaluator reads: "arr_0" uint8 [N, H, W, C] and
/// "labels" int64 [N] (pass an empty labels span to leave them out).
inline void write_samples_npz(const std::string& path, std::span<const std::uint8_t> images, std::int64_t N,
                              std::int64_t H, std::int64_t W, std::int64_t C, std::span<const std::int64_t> labels) {
  PROMOE_CHECK(N >= 0 && H >= 1 && W >= 1 && (C == 1 || C == 3 || C == 4), "write_samples_npz: shape [", N, ", ", H,
               ", ", W, ", ", C, "] is not [N, H, W, C] with C 1, 3 or 4");
  PROMOE_CHECK(labels.empty() || static_cast<std::int64_t>(labels.size()) == N, "write_samples_npz: ", labels.size(),
               " labels for ", N, " images");
  npz_writer w;
  w.add<std::uint8_t>("arr_0", {N, H, W, C}, images);
  if (!labels.empty() || N == 0) w.add<std::int64_t>("labels", {N}, labels);
  w.write(path);
}

/// A parsed and validated .npz held in memory.
class npz_file {
 public:
  /// Reads and validates the archive at path; errors name the path and the problem.
  static npz_file read(const std::string& path) { return parse(read_file_bytes(path), path); }

  /// Parses and validates a whole archive; what names the source in messages.
  static npz_file parse(std::span<const std::byte> b, const std::string& what) {
    npz_file f;
    f.what_ = what;
    const std::uint64_t size = b.size();
    if (size < 22) fail(what, ": not a ZIP archive (", size, " bytes, too short for the end record)");
    // The end record: the last signature whose comment length reaches exactly the end of the file.
    std::uint64_t eocd = size;
    const std::uint64_t lowest = size >= 22 + 0xffff ? size - 22 - 0xffff : 0;
    for (std::uint64_t p = size - 22 + 1; p-- > lowest;) {
      if (detail::get_le(b.data() + p, 4) == detail::zip_end_sig && detail::get_le(b.data() + p + 20, 2) == size - p - 22) {
        eocd = p;
        break;
      }
    }
    if (eocd == size) fail(what, ": not a ZIP archive (no end of central directory record)");
    const std::byte* e = b.data() + eocd;
    const auto disk = detail::get_le(e + 4, 2), cd_disk = detail::get_le(e + 6, 2);
    const auto n_disk = detail::get_le(e + 8, 2), n_total = detail::get_le(e + 10, 2);
    const auto cd_size = detail::get_le(e + 12, 4), cd_offset = detail::get_le(e + 16, 4);
    if (n_total == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu ||
        (eocd >= 20 && detail::get_le(b.data() + eocd - 20, 4) == detail::zip64_locator_sig))
      fail(what, ": ZIP64 archives are not supported");
    if (disk != 0 || cd_disk != 0 || n_disk != n_total) fail(what, ": multi-disk ZIP archives are not supported");
    if (cd_offset > eocd || cd_size != eocd - cd_offset)
      fail(what, ": corrupt ZIP: the central directory (offset ", cd_offset, ", ", cd_size,
           " bytes) does not end where the end record starts (byte ", eocd, ")");
    struct entry {
      std::string name;
      std::uint64_t offset, csize, usize;
      std::uint32_t crc;
      unsigned method, flags;
    };
    std::vector<entry> entries;
    std::uint64_t p = cd_offset;
    for (std::uint64_t i = 0; i < n_total; ++i) {
      if (eocd - p < 46) fail(what, ": corrupt ZIP: central directory entry ", i, " is truncated");
      const std::byte* c = b.data() + p;
      if (detail::get_le(c, 4) != detail::zip_central_sig)
        fail(what, ": corrupt ZIP: bad signature of central directory entry ", i);
      entry en;
      en.flags = static_cast<unsigned>(detail::get_le(c + 8, 2));
      en.method = static_cast<unsigned>(detail::get_le(c + 10, 2));
      en.crc = static_cast<std::uint32_t>(detail::get_le(c + 16, 4));
      en.csize = detail::get_le(c + 20, 4);
      en.usize = detail::get_le(c + 24, 4);
      const auto nlen = detail::get_le(c + 28, 2), xlen = detail::get_le(c + 30, 2), clen = detail::get_le(c + 32, 2);
      en.offset = detail::get_le(c + 42, 4);
      if (eocd - p - 46 < nlen + xlen + clen) fail(what, ": corrupt ZIP: central directory entry ", i, " is truncated");
      en.name.assign(reinterpret_cast<const char*>(c + 46), static_cast<std::size_t>(nlen));
      if (en.csize == 0xffffffffu || en.usize == 0xffffffffu || en.offset == 0xffffffffu || detail::get_le(c + 34, 2) == 0xffff)
        fail(what, ": member '", en.name, "' uses ZIP64, which is not supported");
      if (detail::get_le(c + 34, 2) != 0) fail(what, ": member '", en.name, "' is on another disk (multi-disk archive)");
      if (en.flags & 1u) fail(what, ": member '", en.name, "' is encrypted");
      if (en.method != 0 && en.method != 8)
        fail(what, ": member '", en.name, "' uses compression method ", en.method, " (read: 0 stored, 8 deflate)");
      if (en.method == 0 && en.csize != en.usize)
        fail(what, ": corrupt ZIP: stored member '", en.name, "' has compressed size ", en.csize, " != size ", en.usize);
      for (const auto& other : entries)
        if (other.name == en.name) fail(what, ": member '", en.name, "' appears twice");
      entries.push_back(std::move(en));
      p += 46 + nlen + xlen + clen;
    }
    if (p != eocd) fail(what, ": corrupt ZIP: ", eocd - p, " unexpected bytes at the end of the central directory");

    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // [local header, end of data)
    for (const auto& en : entries) {
      if (en.offset > cd_offset || cd_offset - en.offset < 30)
        fail(what, ": corrupt ZIP: member '", en.name, "' has a local header offset ", en.offset,
             " outside the data area");
      const std::byte* l = b.data() + en.offset;
      if (detail::get_le(l, 4) != detail::zip_local_sig)
        fail(what, ": corrupt ZIP: bad local header signature of member '", en.name, "'");
      const auto lflags = static_cast<unsigned>(detail::get_le(l + 6, 2));
      const auto lmethod = static_cast<unsigned>(detail::get_le(l + 8, 2));
      const auto lcrc = detail::get_le(l + 14, 4), lcsize = detail::get_le(l + 18, 4), lusize = detail::get_le(l + 22, 4);
      const auto nlen = detail::get_le(l + 26, 2), xlen = detail::get_le(l + 28, 2);
      const std::uint64_t data_at = en.offset + 30 + nlen + xlen;
      if (data_at > cd_offset || cd_offset - data_at < en.csize)
        fail(what, ": corrupt ZIP: member '", en.name, "' runs into the central directory (truncated file?)");
      if (std::string_view(reinterpret_cast<const char*>(l + 30), static_cast<std::size_t>(nlen)) != en.name)
        fail(what, ": corrupt ZIP: the local header of member '", en.name, "' names another file");
      if (lmethod != en.method || lflags != en.flags)
        fail(what, ": corrupt ZIP: local and central headers of member '", en.name, "' disagree");
      if (!(lflags & 8u)) {  // without a data descriptor the local header carries CRC and sizes
        std::uint64_t ls = lusize, lc = lcsize;
        if (ls == 0xffffffffu && lc == 0xffffffffu) {  // ZIP64 extra field (np.savez forces one)
          bool found = false;
          for (std::uint64_t x = 0; x + 4 <= xlen;) {
            const std::byte* xf = l + 30 + nlen + x;
            const auto id = detail::get_le(xf, 2), len = detail::get_le(xf + 2, 2);
            if (x + 4 + len > xlen) break;
            if (id == 1 && len >= 16) {
              ls = detail::get_le(xf + 4, 8);
              lc = detail::get_le(xf + 12, 8);
              found = true;
            }
            x += 4 + len;
          }
          if (!found) fail(what, ": corrupt ZIP: member '", en.name, "' lacks the ZIP64 sizes its local header announces");
        }
        if (lcrc != en.crc || ls != en.usize || lc != en.csize)
          fail(what, ": corrupt ZIP: local and central headers of member '", en.name, "' disagree on CRC or sizes");
      }
      ranges.emplace_back(en.offset, data_at + en.csize);
      const auto comp = b.subspan(static_cast<std::size_t>(data_at), static_cast<std::size_t>(en.csize));
      std::vector<std::byte> raw;
      if (en.method == 0) {
        raw.assign(comp.begin(), comp.end());
      } else {
        raw = inflate_(comp, en.usize, what, en.name);
      }
      if (detail::npz_crc32(0, raw.data(), raw.size()) != en.crc)
        fail(what, ": corrupt ZIP: CRC-32 mismatch in member '", en.name, "'");
      std::string key = en.name;
      if (key.size() < 4 || key.compare(key.size() - 4, 4, ".npy") != 0)
        fail(what, ": member '", en.name, "' is not a .npy array");
      key.resize(key.size() - 4);
      f.order_.push_back(key);
      f.arrays_.emplace(key, parse_npy(raw, what + ": '" + key + "'"));
    }
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].first < ranges[i - 1].second) fail(what, ": corrupt ZIP: members overlap");
    return f;
  }

  /// The name given to read() or parse().
  const std::string& source() const { return what_; }

  /// Array names (without ".npy") in archive order.
  const std::vector<std::string>& names() const { return order_; }

  bool contains(const std::string& name) const { return arrays_.count(name) != 0; }

  /// The array; the error lists the names the archive has.
  const npy_array& at(const std::string& name) const {
    const auto it = arrays_.find(name);
    if (it != arrays_.end()) return it->second;
    std::string have;
    for (const auto& n : order_) have += (have.empty() ? "'" : ", '") + n + "'";
    fail(what_, ": no array '", name, "' (the archive has ", order_.empty() ? std::string("none") : have, ")");
  }

 private:
  static std::vector<std::byte> inflate_(std::span<const std::byte> comp, std::uint64_t usize, const std::string& what,
                                         const std::string& name) {
    if (usize > std::numeric_limits<std::size_t>::max() / 2 || comp.size() > UINT_MAX || usize > UINT_MAX)
      fail(what, ": member '", name, "' is too large");
    std::vector<std::byte> raw(static_cast<std::size_t>(usize) + 1);  // + 1: a longer stream shows up
    z_stream zs{};
    if (inflateInit2(&zs, -15) != Z_OK) fail(what, ": cannot initialise zlib");
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(comp.data()));
    zs.avail_in = static_cast<uInt>(comp.size());
    zs.next_out = reinterpret_cast<Bytef*>(raw.data());
    zs.avail_out = static_cast<uInt>(raw.size());
    const int r = inflate(&zs, Z_FINISH);
    const std::uint64_t out = zs.total_out, used = comp.size() - zs.avail_in;
    const std::string msg = zs.msg ? zs.msg : "";
    inflateEnd(&zs);
    if (r != Z_STREAM_END || out != usize || used != comp.size())
      fail(what, ": corrupt ZIP: member '", name, "' does not inflate to its ", usize, " bytes",
           msg.empty() ? std::string() : " (zlib: " + msg + ")");
    raw.resize(static_cast<std::size_t>(usize));
    return raw;
  }

  std::string what_;
  std::vector<std::string> order_;
  std::map<std::string, npy_array> arrays_;
};

}  // namespace promoe::io
