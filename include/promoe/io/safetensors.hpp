// SPDX-License-Identifier: Apache-2.0
/// \file safetensors.hpp
/// \brief Reading and writing safetensors files (https://github.com/huggingface/safetensors):
/// safetensors_file parses and validates a whole file in memory, safetensors_writer builds one
/// and writes it atomically.
///
/// Layout: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON (padded with spaces), then the
/// byte buffer. The JSON object maps each tensor name to {"dtype", "shape", "data_offsets"}
/// ([begin, end) relative to the buffer) and may hold "__metadata__", an object of strings.
/// Reading follows the reference implementation (the Rust crate) and rejects everything it
/// rejects: a header over 100 MB, invalid UTF-8 or JSON, unknown dtypes, byte ranges that
/// disagree with shape x dtype size, and tensors that do not cover the buffer exactly (no
/// overlap, no gap, nothing after the last tensor). Every failure is a promoe::error naming
/// the source, the tensor and what was expected.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_WIN32)
#include <io.h>
#include <process.h>
#else
#include <fcntl.h>
#include <unistd.h>
#endif

#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "atomic_file.hpp"

static_assert(std::endian::native == std::endian::little,
              "promoe/io/safetensors.hpp: safetensors data is little-endian and this reader copies it "
              "as is; big-endian hosts are not supported");

namespace promoe::io {

/// The element types read and written. Other safetensors dtypes (U16, U32, U64, F8_*) are
/// reported as unsupported when a file holds them.
enum class dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

/// Bytes per element.
constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f64:
    case dtype::i64: return 8;
    case dtype::f32:
    case dtype::i32: return 4;
    case dtype::f16:
    case dtype::bf16:
    case dtype::i16: return 2;
    case dtype::i8:
    case dtype::u8:
    case dtype::boolean: return 1;
  }
  return 0;
}

/// The dtype as the header spells it: "F32", "BF16", "BOOL", ...
constexpr std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f64: return "F64";
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::i16: return "I16";
    case dtype::i8: return "I8";
    case dtype::u8: return "U8";
    case dtype::boolean: return "BOOL";
  }
  return "?";
}

/// IEEE 754 binary16 bits to float (exact: every half is a float). Subnormals are
/// normalised, infinities kept, NaNs stay NaN with their sign and payload.
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {  // inf or NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: mant * 2^-24; shift the leading one into the implicit bit
    std::int32_t e = 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    mant &= 0x3ffu;
    bits = sign | (static_cast<std::uint32_t>(e + 112) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

/// bfloat16 bits to float: the upper half of a float.
inline float bf16_to_float(std::uint16_t h) { return static_cast<float>(bf16::from_bits(h)); }

/// One tensor of a file: its byte range [begin, end) in the file's buffer (data_offsets).
struct tensor_entry {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0;
  std::size_t end = 0;

  std::size_t nbytes() const { return end - begin; }
  std::int64_t numel() const { return static_cast<std::int64_t>(nbytes() / dtype_size(type)); }
};

namespace detail {

inline constexpr std::uint64_t max_header_bytes = 100'000'000;  // as the reference implementation
inline constexpr std::size_t max_rank = 1024;                   // bounds memory on hostile headers
inline constexpr int max_json_depth = 64;

inline std::optional<dtype> dtype_from_name(std::string_view s) {
  for (dtype t : {dtype::f64, dtype::f32, dtype::f16, dtype::bf16, dtype::i64, dtype::i32, dtype::i16, dtype::i8,
                  dtype::u8, dtype::boolean})
    if (dtype_name(t) == s) return t;
  return std::nullopt;
}

/// Order of the reference implementation's Dtype enum (increasing alignment); the writer puts
/// larger dtypes first so each tensor's data is aligned to its element size.
constexpr int alignment_rank(dtype t) {
  switch (t) {
    case dtype::boolean: return 0;
    case dtype::u8: return 1;
    case dtype::i8: return 2;
    case dtype::i16: return 5;
    case dtype::f16: return 7;
    case dtype::bf16: return 8;
    case dtype::i32: return 9;
    case dtype::f32: return 11;
    case dtype::f64: return 12;
    case dtype::i64: return 13;
  }
  return 0;
}

/// Byte offset of the first invalid UTF-8 sequence (overlong forms and surrogates included).
inline std::optional<std::size_t> invalid_utf8_at(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1fu;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0fu;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return i;
    }
    if (s.size() - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0u) != 0x80u) return i;
      cp = (cp << 6) | (cc & 0x3fu);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return i;
    if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return i;
    i += len;
  }
  return std::nullopt;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

/// A JSON string literal the way serde_json writes it (the reference writer).
inline void append_json_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xf];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

inline std::uint64_t load_le64(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}

/// a * b, or nullopt on overflow of 64 bits.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

/// numel(shape) * dtype_size(t) for non-negative dimensions, or nullopt on overflow (a zero
/// dimension makes any shape zero bytes).
inline std::optional<std::uint64_t> byte_count(dtype t, const std::vector<std::int64_t>& shape) {
  if (std::find(shape.begin(), shape.end(), std::int64_t{0}) != shape.end()) return 0;
  std::optional<std::uint64_t> n = dtype_size(t);
  for (const std::int64_t d : shape) {
    n = checked_mul(*n, static_cast<std::uint64_t>(d));
    if (!n) break;
  }
  return n;
}

/// A strict JSON (RFC 8259) parser that reads the safetensors header schema directly, without
/// building a document tree, so memory stays proportional to what the header declares.
/// Unknown keys inside a tensor entry are parsed and ignored, as the reference reader does.
class header_parser {
 public:
  header_parser(std::string_view text, const std::string& what) : s_(text), what_(what) {}

  void parse(std::map<std::string, tensor_entry>& tensors, std::map<std::string, std::string>& metadata) {
    if (const auto bad = invalid_utf8_at(s_)) {
      i_ = *bad;
      syntax("invalid UTF-8");
    }
    skip_ws();
    if (at_end()) syntax("the header is empty");
    if (peek() != '{') schema("the header must be a JSON object, found ", kind_here());
    ++i_;
    bool seen_metadata = false;
    members_(1, [&](std::string key) {
      if (key == "__metadata__") {
        if (seen_metadata) schema("\"__metadata__\" appears twice in the header");
        seen_metadata = true;
        metadata_(metadata);
      } else {
        if (tensors.count(key)) schema("tensor '", key, "' appears twice in the header");
        tensor_entry e = tensor_(key);
        tensors.emplace(std::move(key), std::move(e));
      }
    });
    skip_ws();
    if (!at_end()) syntax("unexpected ", kind_here(), " after the header object");
  }

 private:
  struct number {
    bool negative = false;
    bool integer = true;
    bool overflow = false;
    std::uint64_t magnitude = 0;
    std::string_view text;
  };

  template <class... Args>
  [[noreturn]] void syntax(const Args&... args) const {
    fail(what_, ": header is not valid JSON: ", args..., " (at header byte ", i_, ")");
  }
  template <class... Args>
  [[noreturn]] void schema(const Args&... args) const {
    fail(what_, ": ", args...);
  }
  template <class... Args>
  [[noreturn]] void tensor_fail(const std::string& name, const Args&... args) const {
    fail(what_, ": tensor '", name, "': ", args...);
  }

  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return s_[i_]; }
  static bool is_digit(char c) { return c >= '0' && c <= '9'; }
  void skip_ws() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++i_;
  }

  /// What the next value is, for messages.
  std::string kind_here() const {
    if (at_end()) return "the end of the header";
    const char c = peek();
    switch (c) {
      case '{': return "an object";
      case '[': return "an array";
      case '"': return "a string";
      case 't':
      case 'f': return "a boolean";
      case 'n': return "null";
      default: break;
    }
    if (c == '-' || is_digit(c)) return "a number";
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
    static constexpr char hex[] = "0123456789abcdef";
    return std::string("byte 0x") + hex[u >> 4] + hex[u & 0xf];
  }

  void expect_(char c) {
    skip_ws();
    if (at_end()) syntax("unexpected end of the header, expected '", c, "'");
    if (peek() != c) syntax("expected '", c, "', found ", kind_here());
    ++i_;
  }

  /// Members of an object whose '{' was consumed: calls on_member(key) with the position at
  /// the value, which on_member must consume.
  template <class F>
  void members_(int depth, F&& on_member) {
    if (depth > max_json_depth) syntax("nesting deeper than ", max_json_depth, " levels");
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++i_;
      return;
    }
    for (;;) {
      skip_ws();
      if (at_end()) syntax("unexpected end of the header inside an object");
      if (peek() != '"') syntax("expected a string key, found ", kind_here());
      std::string key = string_();
      expect_(':');
      skip_ws();
      on_member(std::move(key));
      skip_ws();
      if (at_end()) syntax("unexpected end of the header inside an object");
      if (peek() == ',') {
        ++i_;
        skip_ws();
        if (!at_end() && peek() == '}') syntax("trailing comma before '}'");
        continue;
      }
      if (peek() == '}') {
        ++i_;
        return;
      }
      syntax("expected ',' or '}' after an object member, found ", kind_here());
    }
  }

  /// Elements of an array whose '[' was consumed: calls on_element() at each element.
  template <class F>
  void elements_(int depth, F&& on_element) {
    if (depth > max_json_depth) syntax("nesting deeper than ", max_json_depth, " levels");
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++i_;
      return;
    }
    for (;;) {
      skip_ws();
      on_element();
      skip_ws();
      if (at_end()) syntax("unexpected end of the header inside an array");
      if (peek() == ',') {
        ++i_;
        skip_ws();
        if (!at_end() && peek() == ']') syntax("trailing comma before ']'");
        continue;
      }
      if (peek() == ']') {
        ++i_;
        return;
      }
      syntax("expected ',' or ']' after an array element, found ", kind_here());
    }
  }

  unsigned hex4_() {
    if (s_.size() - i_ < 4) syntax("unterminated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_];
      unsigned d;
      if (c >= '0' && c <= '9') d = static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') d = static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = static_cast<unsigned>(c - 'A' + 10);
      else syntax("invalid \\u escape (expected 4 hex digits)");
      v = (v << 4) | d;
      ++i_;
    }
    return v;
  }

  /// A string literal at '"' (the header is valid UTF-8, checked up front).
  std::string string_() {
    ++i_;
    std::string out;
    for (;;) {
      if (at_end()) syntax("unterminated string");
      const char c = peek();
      if (c == '"') {
        ++i_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) syntax("unescaped control character in a string");
      if (c != '\\') {
        out += c;
        ++i_;
        continue;
      }
      ++i_;
      if (at_end()) syntax("unterminated string");
      const char e = peek();
      ++i_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4_();
          if (cp >= 0xDC00 && cp <= 0xDFFF) syntax("lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.size() - i_ < 2 || s_[i_] != '\\' || s_[i_ + 1] != 'u')
              syntax("high surrogate not followed by a low surrogate in a \\u escape");
            i_ += 2;
            const std::uint32_t lo = hex4_();
            if (lo < 0xDC00 || lo > 0xDFFF) syntax("high surrogate not followed by a low surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: --i_; syntax("invalid escape '\\", e, "' in a string");
      }
    }
  }

  /// A number at '-' or a digit: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
  number number_() {
    number n;
    const std::size_t start = i_;
    if (peek() == '-') {
      n.negative = true;
      ++i_;
    }
    if (at_end() || !is_digit(peek())) syntax("invalid number");
    if (peek() == '0') {
      ++i_;
      if (!at_end() && is_digit(peek())) syntax("leading zero in a number");
    } else {
      while (!at_end() && is_digit(peek())) {
        const auto d = static_cast<std::uint64_t>(peek() - '0');
        if (n.magnitude > (std::numeric_limits<std::uint64_t>::max() - d) / 10) n.overflow = true;
        else n.magnitude = n.magnitude * 10 + d;
        ++i_;
      }
    }
    if (!at_end() && peek() == '.') {
      n.integer = false;
      ++i_;
      if (at_end() || !is_digit(peek())) syntax("expected a digit after '.' in a number");
      while (!at_end() && is_digit(peek())) ++i_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      n.integer = false;
      ++i_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++i_;
      if (at_end() || !is_digit(peek())) syntax("expected a digit in the exponent of a number");
      while (!at_end() && is_digit(peek())) ++i_;
    }
    n.text = s_.substr(start, i_ - start);
    return n;
  }

  void literal_(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) syntax("invalid literal (expected '", word, "')");
    i_ += word.size();
  }

  /// Any value, checked and discarded.
  void skip_value_(int depth) {
    if (depth > max_json_depth) syntax("nesting deeper than ", max_json_depth, " levels");
    if (at_end()) syntax("unexpected end of the header, expected a value");
    const char c = peek();
    if (c == '{') {
      ++i_;
      members_(depth + 1, [&](std::string) { skip_value_(depth + 1); });
    } else if (c == '[') {
      ++i_;
      elements_(depth + 1, [&] { skip_value_(depth + 1); });
    } else if (c == '"') {
      string_();
    } else if (c == 't') {
      literal_("true");
    } else if (c == 'f') {
      literal_("false");
    } else if (c == 'n') {
      literal_("null");
    } else if (c == '-' || is_digit(c)) {
      number_();
    } else {
      syntax("unexpected ", kind_here());
    }
  }

  /// A non-negative integer that fits in int64 (shape dimensions, offsets).
  std::uint64_t index_(const std::string& name, const char* field) {
    if (at_end() || !(peek() == '-' || is_digit(peek())))
      tensor_fail(name, "\"", field, "\" must hold non-negative integers, found ", kind_here());
    const number n = number_();
    if (!n.integer) tensor_fail(name, "\"", field, "\" must hold non-negative integers, found ", n.text);
    if (n.negative && (n.magnitude != 0 || n.overflow))
      tensor_fail(name, "\"", field, "\" must hold non-negative integers, found ", n.text);
    if (n.overflow || n.magnitude > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      tensor_fail(name, "\"", field, "\" holds ", n.text, ", which is too large");
    return n.magnitude;
  }

  std::vector<std::uint64_t> index_array_(const std::string& name, const char* field) {
    if (at_end() || peek() != '[')
      tensor_fail(name, "\"", field, "\" must be an array of non-negative integers, found ", kind_here());
    ++i_;
    std::vector<std::uint64_t> out;
    elements_(3, [&] {
      if (out.size() == max_rank) tensor_fail(name, "\"", field, "\" has more than ", max_rank, " entries");
      out.push_back(index_(name, field));
    });
    return out;
  }

  tensor_entry tensor_(const std::string& name) {
    if (at_end() || peek() != '{')
      tensor_fail(name, "the entry must be an object with \"dtype\", \"shape\" and \"data_offsets\", found ",
                  kind_here());
    ++i_;
    tensor_entry e;
    e.name = name;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    members_(2, [&](std::string key) {
      if (key == "dtype") {
        if (has_dtype) tensor_fail(name, "\"dtype\" appears twice");
        has_dtype = true;
        if (at_end() || peek() != '"') tensor_fail(name, "\"dtype\" must be a string, found ", kind_here());
        const std::string s = string_();
        const auto t = dtype_from_name(s);
        if (!t)
          tensor_fail(name, "unknown or unsupported dtype '", s,
                      "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
        e.type = *t;
      } else if (key == "shape") {
        if (has_shape) tensor_fail(name, "\"shape\" appears twice");
        has_shape = true;
        for (const std::uint64_t d : index_array_(name, "shape")) e.shape.push_back(static_cast<std::int64_t>(d));
      } else if (key == "data_offsets") {
        if (has_offsets) tensor_fail(name, "\"data_offsets\" appears twice");
        has_offsets = true;
        const auto offsets = index_array_(name, "data_offsets");
        if (offsets.size() != 2)
          tensor_fail(name, "\"data_offsets\" must be [begin, end], found ", offsets.size(), " entries");
        if (offsets[0] > std::numeric_limits<std::size_t>::max() || offsets[1] > std::numeric_limits<std::size_t>::max())
          tensor_fail(name, "\"data_offsets\" [", offsets[0], ", ", offsets[1], "] do not fit in memory");
        e.begin = static_cast<std::size_t>(offsets[0]);
        e.end = static_cast<std::size_t>(offsets[1]);
      } else {
        skip_value_(3);
      }
    });
    if (!has_dtype) tensor_fail(name, "missing \"dtype\"");
    if (!has_shape) tensor_fail(name, "missing \"shape\"");
    if (!has_offsets) tensor_fail(name, "missing \"data_offsets\"");
    return e;
  }

  void metadata_(std::map<std::string, std::string>& metadata) {
    if (!at_end() && peek() == 'n') {  // "__metadata__": null is what the reference reads as none
      literal_("null");
      return;
    }
    if (at_end() || peek() != '{') schema("\"__metadata__\" must be an object of strings, found ", kind_here());
    ++i_;
    members_(2, [&](std::string key) {
      if (at_end() || peek() != '"')
        schema("\"__metadata__\" value of '", key, "' must be a string, found ", kind_here());
      std::string value = string_();
      if (!metadata.emplace(key, std::move(value)).second)
        schema("\"__metadata__\" key '", key, "' appears twice");
    });
  }

  std::string_view s_;
  const std::string& what_;
  std::size_t i_ = 0;
};

/// Checks every tensor's byte range against its shape and dtype and that the ranges tile
/// [0, buffer_size) exactly.
inline void check_layout(const std::map<std::string, tensor_entry>& tensors, std::uint64_t buffer_size,
                         const std::string& what) {
  std::vector<const tensor_entry*> order;
  order.reserve(tensors.size());
  for (const auto& [name, e] : tensors) {
    const auto bytes = byte_count(e.type, e.shape);
    if (!bytes) fail(what, ": tensor '", name, "': shape ", ::promoe::detail::shape_string(e.shape), " overflows");
    if (e.begin > e.end)
      fail(what, ": tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] have begin > end");
    if (e.end > buffer_size)
      fail(what, ": tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] run past the end of the ",
           buffer_size, "-byte buffer (truncated file?)");
    if (e.end - e.begin != *bytes)
      fail(what, ": tensor '", name, "': data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin,
           " bytes, but shape ", ::promoe::detail::shape_string(e.shape), " of ", dtype_name(e.type), " needs ",
           *bytes);
    order.push_back(&e);
  }
  std::sort(order.begin(), order.end(), [](const tensor_entry* a, const tensor_entry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::uint64_t covered = 0;
  const tensor_entry* last = nullptr;
  for (const tensor_entry* e : order) {
    if (e->begin < covered)
      fail(what, ": tensor '", e->name, "' (bytes [", e->begin, ", ", e->end, ")) overlaps tensor '", last->name,
           "' (bytes [", last->begin, ", ", last->end, "))");
    if (e->begin > covered)
      fail(what, ": bytes [", covered, ", ", e->begin, ") of the buffer belong to no tensor (gap before tensor '",
           e->name, "'); the tensors must cover the buffer exactly");
    covered = e->end;
    if (e->end > e->begin || !last) last = e;
  }
  if (covered != buffer_size)
    fail(what, ": the tensors cover ", covered, " bytes but the buffer has ", buffer_size,
         " (trailing bytes after the last tensor); the tensors must cover the buffer exactly");
}

template <class T>
constexpr const char* value_type_name() {
  if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, float>) return "float";
  else return "int64_t";
}

/// out[i] = f(element i read as S).
template <class S, class T, class F>
void convert(const std::byte* p, std::vector<T>& out, F f) {
  for (std::size_t i = 0; i < out.size(); ++i) {
    S s;
    std::memcpy(&s, p + i * sizeof(S), sizeof(S));
    out[i] = static_cast<T>(f(s));
  }
}

}  // namespace detail

/// A parsed and validated safetensors file held in memory.
class safetensors_file {
 public:
  /// Reads and validates the file at path; errors name the path and the problem.
  static safetensors_file read(const std::string& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(path, ec)) fail(path, ": is a directory, not a safetensors file");
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(path, ": cannot open for reading (", detail::errno_message(errno), ")");
    const std::uintmax_t size = fs::file_size(path, ec);
    if (ec) fail(path, ": cannot determine the file size (", ec.message(), ")");
    if (size < 8) fail(path, ": file has ", size, " bytes, too short for the 8-byte header length");
    std::byte prefix[8];
    if (!in.read(reinterpret_cast<char*>(prefix), 8)) fail(path, ": read error in the header length");
    const std::uint64_t n = header_length_(detail::load_le64(prefix), size, path);
    std::string header(static_cast<std::size_t>(n), '\0');
    if (!in.read(header.data(), static_cast<std::streamsize>(n))) fail(path, ": read error in the header");
    const std::uint64_t buffer_size = size - 8 - n;
    if (buffer_size > std::numeric_limits<std::size_t>::max()) fail(path, ": the buffer does not fit in memory");
    safetensors_file file = from_header_(header, buffer_size, path);
    file.buffer_.resize(static_cast<std::size_t>(buffer_size));
    if (buffer_size && !in.read(reinterpret_cast<char*>(file.buffer_.data()), static_cast<std::streamsize>(buffer_size)))
      fail(path, ": read error in the tensor data (file shorter than its size?)");
    return file;
  }

  /// Parses and validates a whole file's bytes; 'what' names the source in messages.
  static safetensors_file parse(std::span<const std::byte> bytes, const std::string& what) {
    if (bytes.size() < 8) fail(what, ": file has ", bytes.size(), " bytes, too short for the 8-byte header length");
    const std::uint64_t n = header_length_(detail::load_le64(bytes.data()), bytes.size(), what);
    const auto header = bytes.subspan(8, static_cast<std::size_t>(n));
    const auto buffer = bytes.subspan(8 + static_cast<std::size_t>(n));
    safetensors_file file =
        from_header_(std::string_view(reinterpret_cast<const char*>(header.data()), header.size()), buffer.size(), what);
    file.buffer_.assign(buffer.begin(), buffer.end());
    return file;
  }

  /// The name given to read() or parse().
  const std::string& source() const { return what_; }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// The tensor's entry; the error lists (the first few of) the tensors the file has.
  const tensor_entry& at(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it != tensors_.end()) return it->second;
    std::string have;
    std::size_t shown = 0;
    for (const auto& [n, e] : tensors_) {
      if (shown == 8) {
        have += ", ...";
        break;
      }
      have += (shown++ ? ", '" : "'") + n + "'";
    }
    if (tensors_.empty()) fail(what_, ": no tensor '", name, "' (the file has no tensors)");
    fail(what_, ": no tensor '", name, "' (the file has ", tensors_.size(), " tensors: ", have, ")");
  }

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  /// The tensor's raw little-endian bytes.
  std::span<const std::byte> data(const std::string& name) const {
    const tensor_entry& e = at(name);
    return std::span<const std::byte>(buffer_).subspan(e.begin, e.nbytes());
  }

  /// The tensor's values, row-major. double and float read F64, F32, F16 and BF16; int64_t
  /// reads I64, I32, I16, I8, U8 and BOOL (as 0/1). Anything else is an error.
  template <class T>
  std::vector<T> values(const std::string& name) const {
    static_assert(std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, std::int64_t>,
                  "safetensors_file::values<T>: T must be double, float or std::int64_t");
    const tensor_entry& e = at(name);
    std::vector<T> out(static_cast<std::size_t>(e.numel()));
    const std::byte* p = buffer_.data() + e.begin;
    const auto same = [](auto v) { return v; };
    if constexpr (std::is_floating_point_v<T>) {
      switch (e.type) {
        case dtype::f64: detail::convert<double>(p, out, same); return out;
        case dtype::f32: detail::convert<float>(p, out, same); return out;
        case dtype::f16: detail::convert<std::uint16_t>(p, out, f16_to_float); return out;
        case dtype::bf16: detail::convert<std::uint16_t>(p, out, bf16_to_float); return out;
        default: break;
      }
      fail(what_, ": tensor '", name, "' has dtype ", dtype_name(e.type), "; values<", detail::value_type_name<T>(),
           "> reads F64, F32, F16 or BF16");
    } else {
      switch (e.type) {
        case dtype::i64: detail::convert<std::int64_t>(p, out, same); return out;
        case dtype::i32: detail::convert<std::int32_t>(p, out, same); return out;
        case dtype::i16: detail::convert<std::int16_t>(p, out, same); return out;
        case dtype::i8: detail::convert<std::int8_t>(p, out, same); return out;
        case dtype::u8: detail::convert<std::uint8_t>(p, out, same); return out;
        case dtype::boolean: detail::convert<std::uint8_t>(p, out, [](std::uint8_t b) { return b != 0; }); return out;
        default: break;
      }
      fail(what_, ": tensor '", name, "' has dtype ", dtype_name(e.type), "; values<", detail::value_type_name<T>(),
           "> reads I64, I32, I16, I8, U8 or BOOL");
    }
  }

  /// values(name) after checking the shape: "tensor 'x' has shape [2, 3], expected [2, 4]".
  template <class T>
  std::vector<T> values(const std::string& name, const std::vector<std::int64_t>& expected_shape) const {
    const tensor_entry& e = at(name);
    if (e.shape != expected_shape)
      fail(what_, ": tensor '", name, "' has shape ", ::promoe::detail::shape_string(e.shape), ", expected ",
           ::promoe::detail::shape_string(expected_shape));
    return values<T>(name);
  }

  /// The "__metadata__" strings (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  static std::uint64_t header_length_(std::uint64_t n, std::uint64_t file_size, const std::string& what) {
    if (n > detail::max_header_bytes)
      fail(what, ": header length ", n, " exceeds the limit of ", detail::max_header_bytes, " bytes (corrupt file?)");
    if (n > file_size - 8)
      fail(what, ": header length ", n, " runs past the end of the file (", file_size, " bytes, so at most ",
           file_size - 8, " bytes of header)");
    return n;
  }

  static safetensors_file from_header_(std::string_view header, std::uint64_t buffer_size, const std::string& what) {
    safetensors_file file;
    file.what_ = what;
    detail::header_parser(header, what).parse(file.tensors_, file.metadata_);
    detail::check_layout(file.tensors_, buffer_size, what);
    return file;
  }

  std::string what_;
  std::map<std::string, tensor_entry> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::byte> buffer_;
};

/// Builds a safetensors file. The layout follows the reference writer (and so the Python
/// library): tensors ordered by decreasing dtype size, then by name, in both the header and the
/// buffer; "__metadata__" first when there is any; the header padded with spaces to a multiple
/// of 8 bytes.
class safetensors_writer {
 public:
  /// Copies numel(shape) * dtype_size(type) bytes from data (host, little-endian).
  void add(const std::string& name, dtype type, std::vector<std::int64_t> shape, const void* data) {
    check_string_("tensor name", name);
    PROMOE_CHECK(name != "__metadata__", "safetensors_writer::add: '__metadata__' is reserved and cannot name a tensor");
    PROMOE_CHECK(!tensors_.count(name), "safetensors_writer::add: tensor '", name, "' was already added");
    const std::size_t bytes = checked_bytes_(name, type, shape);
    PROMOE_CHECK(bytes == 0 || data != nullptr, "safetensors_writer::add: tensor '", name, "': data is null");
    pending p{type, std::move(shape), std::vector<std::byte>(bytes)};
    if (bytes) std::memcpy(p.data.data(), data, bytes);
    tensors_.emplace(name, std::move(p));
  }

  /// dtype from T: double F64, float F32, int64_t I64, int32_t I32, int16_t I16, int8_t I8,
  /// uint8_t U8. The number of values must match the shape.
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const std::vector<T>& values) {
    constexpr dtype type = dtype_of_<T>();
    const std::size_t count = checked_bytes_(name, type, shape) / sizeof(T);
    PROMOE_CHECK(values.size() == count, "safetensors_writer::add: tensor '", name, "': ", values.size(),
                 " values for shape ", ::promoe::detail::shape_string(shape), " (", count, " elements)");
    add(name, type, std::move(shape), values.data());
  }

  /// Sets (or replaces) one "__metadata__" entry.
  void set_metadata(std::string key, std::string value) {
    check_string_("metadata key", key);
    check_string_("metadata value", value);
    metadata_[std::move(key)] = std::move(value);
  }

  /// The whole file.
  std::vector<std::byte> bytes() const {
    const std::string head = header_();
    std::size_t total = head.size();
    for (const auto& kv : tensors_) total += kv.second.data.size();
    std::vector<std::byte> out(head.size());
    out.reserve(total);
    std::memcpy(out.data(), head.data(), head.size());
    for (const auto* kv : order_()) out.insert(out.end(), kv->second.data.begin(), kv->second.data.end());
    return out;
  }

  /// Writes the file atomically: into a temporary file in the same directory, flushed to disk,
  /// then renamed over path. On failure the temporary file is removed, path keeps its old
  /// contents, and promoe::error names the path and the problem.
  void write(const std::string& path) const {
    const std::string head = header_();
    write_file_atomically(path, "safetensors_writer::write", [&](detail::output_file& out) {
      out.write(head.data(), head.size());
      for (const auto* kv : order_()) out.write(kv->second.data.data(), kv->second.data.size());
    });
  }

 private:
  struct pending {
    dtype type;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };
  using item = std::map<std::string, pending>::value_type;

  template <class T>
  static constexpr dtype dtype_of_() {
    if constexpr (std::is_same_v<T, double>) return dtype::f64;
    else if constexpr (std::is_same_v<T, float>) return dtype::f32;
    else if constexpr (std::is_same_v<T, std::int64_t>) return dtype::i64;
    else if constexpr (std::is_same_v<T, std::int32_t>) return dtype::i32;
    else if constexpr (std::is_same_v<T, std::int16_t>) return dtype::i16;
    else if constexpr (std::is_same_v<T, std::int8_t>) return dtype::i8;
    else if constexpr (std::is_same_v<T, std::uint8_t>) return dtype::u8;
    else static_assert(sizeof(T) == 0, "safetensors_writer::add: T must be double, float, int64_t, int32_t, "
                                       "int16_t, int8_t or uint8_t (use the dtype overload for F16, BF16, BOOL)");
  }

  /// The tensor's size in bytes; negative dimensions and overflow are errors.
  static std::size_t checked_bytes_(const std::string& name, dtype type, const std::vector<std::int64_t>& shape) {
    for (const std::int64_t d : shape)
      PROMOE_CHECK(d >= 0, "safetensors_writer::add: tensor '", name, "' has a negative dimension in shape ",
                   ::promoe::detail::shape_string(shape));
    const auto bytes = detail::byte_count(type, shape);
    PROMOE_CHECK(bytes && *bytes <= std::numeric_limits<std::size_t>::max() / 2, "safetensors_writer::add: tensor '",
                 name, "' shape ", ::promoe::detail::shape_string(shape), " is too large");
    return static_cast<std::size_t>(*bytes);
  }

  static void check_string_(const char* what, const std::string& s) {
    PROMOE_CHECK(!detail::invalid_utf8_at(s), "safetensors_writer: ", what, " '", s, "' is not valid UTF-8");
  }

  /// Decreasing dtype size (the reference's alignment order), then name.
  std::vector<const item*> order_() const {
    std::vector<const item*> order;
    order.reserve(tensors_.size());
    for (const auto& kv : tensors_) order.push_back(&kv);
    std::stable_sort(order.begin(), order.end(), [](const item* a, const item* b) {
      return detail::alignment_rank(a->second.type) > detail::alignment_rank(b->second.type);
    });
    return order;
  }

  /// The 8-byte length and the padded JSON header.
  std::string header_() const {
    std::string json = "{";
    bool first = true;
    if (!metadata_.empty()) {
      json += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata_) {
        if (!first) json += ',';
        first = false;
        detail::append_json_string(json, k);
        json += ':';
        detail::append_json_string(json, v);
      }
      json += '}';
      first = false;
    }
    std::uint64_t offset = 0;
    for (const auto* kv : order_()) {
      if (!first) json += ',';
      first = false;
      detail::append_json_string(json, kv->first);
      json += ":{\"dtype\":\"";
      json += dtype_name(kv->second.type);
      json += "\",\"shape\":[";
      for (std::size_t i = 0; i < kv->second.shape.size(); ++i) {
        if (i) json += ',';
        json += std::to_string(kv->second.shape[i]);
      }
      const std::uint64_t end = offset + kv->second.data.size();
      json += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
      offset = end;
    }
    json += '}';
    json.append((8 - json.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
    return out + json;
  }

  std::map<std::string, pending> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace promoe::io
