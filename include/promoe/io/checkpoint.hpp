// SPDX-License-Identifier: Apache-2.0
/// \file checkpoint.hpp
/// \brief Training checkpoints: named groups of tensors (model, EMA, optimizer state, ...)
/// plus the training position (step, random-number state, config, free-form keys) in ONE
/// safetensors file, written atomically and read back bit for bit.
///
/// File layout (an ordinary safetensors file, so any safetensors reader can open it):
///  - every tensor is stored as "<group>/<name>" ("model/blocks.0.attn.qkv.weight",
///    "ema/...", "optim/exp_avg.blocks.0...."), in the training's scalar type (F32 for float,
///    F64 for double), with T's exact bytes;
///  - "__metadata__" holds "format" = "promoe-checkpoint", "version" = "1", "dtype" ("F32" or
///    "F64"), "groups" (the group names in save order, comma-separated; a group may be empty),
///    "step", "rng_seed", "rng_streams" (decimal, exact over all of uint64), "config" (the
///    caller's config JSON text, verbatim) and any extra keys the caller adds ("optim_step",
///    "data_cursor", ...).
///
/// Saving goes through safetensors_writer::write: the file is written to a temporary file
/// next to the target ("<file>.tmp.<pid>.<n>"), flushed to disk and renamed over the target,
/// so an interrupted save never destroys the previous checkpoint. A failed save (an error,
/// a full disk) removes its temporary file; a process killed during a save (SIGKILL, power
/// loss) leaves it behind. Such stale temporary files are harmless (nothing reads them) and
/// the next successful save of the same path removes those whose writer process is gone
/// (remove_stale_temp_files).
///
/// bf16 training: groups of bf16 tensors (a bf16 model's weights) are passed as bf16_groups
/// and stored widened to the checkpoint's scalar type (exact), and read back rounded (exact
/// again for values that were bf16). The optimizer's float32 master weights and the float32
/// EMA go in the ordinary groups. A bf16 run's checkpoint is thus an ordinary F32 checkpoint:
/// a float32 model (or PyTorch) loads its groups as they are.
///
/// Loading validates everything before writing anything into the destination tensors:
/// the safetensors structure, format and version, the metadata, the dtype, the config
/// (compared as JSON: key order, whitespace and number spelling do not matter), the presence
/// and shape of every expected tensor and the absence of unexpected ones in the groups being
/// loaded. A failed load therefore leaves the model, EMA and optimizer state untouched.
///
/// Typical use:
/// \code
///   using group = io::checkpoint_group<float, backend::cpu>;
///   auto model_tensors = model.parameters();
///   for (auto& b : model.buffers()) model_tensors.push_back(b);
///   std::vector<group> groups{{"model", model_tensors}, {"ema", ema.state()}, {"optim", opt.state()}};
///   io::checkpoint_info info;
///   info.step = step;
///   info.set_rng(gen);
///   info.config = config_json;
///   info.extra["optim_step"] = std::to_string(opt.step());
///   io::save_checkpoint(path, groups, info);
///   ...
///   const auto loaded = io::load_checkpoint(path, groups, config_json);  // throws, model untouched
///   rng gen = loaded.make_rng();
/// \endcode
#pragma once

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(_WIN32)
#include <csignal>
#include <sys/types.h>
#include <unistd.h>
#endif

#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "safetensors.hpp"

namespace promoe::io {

/// "format" metadata value of every checkpoint.
inline constexpr std::string_view checkpoint_format = "promoe-checkpoint";
/// The "version" this build writes and reads.
inline constexpr std::string_view checkpoint_version = "1";

/// A named group of tensors: the destinations of a load, the sources of a save. The tensors'
/// pointers are in backend B's memory; grad pointers are ignored.
template <class T, class B>
struct checkpoint_group {
  std::string name;  ///< non-empty, without '/' or ','
  std::vector<named_parameter<T>> tensors;
};

/// The training position stored with the tensors.
struct checkpoint_info {
  std::uint64_t step = 0;
  std::uint64_t rng_seed = 0;
  std::uint64_t rng_streams = 0;
  std::string config;                          ///< config JSON text, stored verbatim
  std::map<std::string, std::string> extra;    ///< free-form keys (not the reserved ones)

  // Filled by read_checkpoint_info and load_checkpoint; ignored by save_checkpoint.
  std::string dtype;                 ///< "F32" or "F64"
  std::vector<std::string> groups;   ///< group names in save order

  /// Records a generator's seed and position.
  void set_rng(const rng& r) {
    rng_seed = r.seed();
    rng_streams = r.streams_used();
  }
  /// A generator at the recorded seed and position.
  rng make_rng() const {
    rng r(rng_seed);
    r.set_streams_used(rng_streams);
    return r;
  }
};

namespace detail {

inline constexpr std::string_view checkpoint_reserved_keys[] = {"format", "version",     "dtype", "groups",
                                                                "step",   "rng_seed",    "rng_streams",
                                                                "config"};

inline bool checkpoint_reserved(std::string_view key) {
  return std::find(std::begin(checkpoint_reserved_keys), std::end(checkpoint_reserved_keys), key) !=
         std::end(checkpoint_reserved_keys);
}

template <class T>
constexpr dtype checkpoint_dtype() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "promoe checkpoints hold float (F32) or double (F64) tensors");
  return std::is_same_v<T, double> ? dtype::f64 : dtype::f32;
}

inline const char* checkpoint_type_name(dtype t) { return t == dtype::f64 ? "double" : "float"; }

inline bool valid_group_name(const std::string& g) {
  return !g.empty() && g.find('/') == std::string::npos && g.find(',') == std::string::npos;
}

/// Decimal digits only, exact over uint64 (no sign, no spaces, no overflow).
inline std::optional<std::uint64_t> parse_u64(std::string_view s) {
  if (s.empty() || s.size() > 20) return std::nullopt;
  for (const char c : s)
    if (c < '0' || c > '9') return std::nullopt;
  std::uint64_t v = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size()) return std::nullopt;
  return v;
}

/// A checkpoint's header: what read_checkpoint_info needs, read without the tensor data.
struct checkpoint_header {
  std::map<std::string, tensor_entry> tensors;
  std::map<std::string, std::string> metadata;
};

/// Reads and validates the safetensors header of the file at path against its size (layout
/// included, so a truncated file is an error) without reading the tensor data.
inline checkpoint_header read_safetensors_header(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail(path, ": is a directory, not a checkpoint file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open for reading (", errno_message(errno), ")");
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) fail(path, ": cannot determine the file size (", ec.message(), ")");
  if (size < 8) fail(path, ": file has ", size, " bytes, too short for the 8-byte header length");
  std::byte prefix[8];
  if (!in.read(reinterpret_cast<char*>(prefix), 8)) fail(path, ": read error in the header length");
  const std::uint64_t n = load_le64(prefix);
  if (n > max_header_bytes)
    fail(path, ": header length ", n, " exceeds the limit of ", max_header_bytes, " bytes (corrupt file?)");
  if (n > size - 8)
    fail(path, ": header length ", n, " runs past the end of the file (", size, " bytes, so at most ", size - 8,
         " bytes of header)");
  std::string header(static_cast<std::size_t>(n), '\0');
  if (n && !in.read(header.data(), static_cast<std::streamsize>(n))) fail(path, ": read error in the header");
  checkpoint_header out;
  header_parser(header, path).parse(out.tensors, out.metadata);
  check_layout(out.tensors, size - 8 - n, path);
  return out;
}

/// Checks the metadata and the tensor names and dtypes of a parsed checkpoint; the info
/// (dtype and groups filled).
template <class Names, class EntryOf>
checkpoint_info checkpoint_info_from(const std::map<std::string, std::string>& md, const Names& names,
                                     EntryOf&& entry_of, const std::string& what) {
  const auto get = [&](const char* key) -> const std::string& {
    const auto it = md.find(key);
    if (it == md.end()) fail(what, ": checkpoint metadata has no \"", key, "\" entry");
    return it->second;
  };
  const auto fmt = md.find("format");
  if (fmt == md.end())
    fail(what, ": not a promoe checkpoint: no \"format\" metadata",
         md.empty() ? " (a plain safetensors file?)" : " (a safetensors file from elsewhere?)");
  if (fmt->second != checkpoint_format)
    fail(what, ": not a promoe checkpoint: format is '", fmt->second, "', expected '", checkpoint_format, "'");
  const std::string& version = get("version");
  if (version != checkpoint_version)
    fail(what, ": checkpoint version '", version, "' is not supported (this build reads version ",
         checkpoint_version, ")");

  checkpoint_info info;
  const auto number = [&](const char* key) {
    const std::string& s = get(key);
    const auto v = parse_u64(s);
    if (!v) fail(what, ": checkpoint metadata \"", key, "\" is '", s, "', expected a decimal integer in [0, 2^64)");
    return *v;
  };
  info.step = number("step");
  info.rng_seed = number("rng_seed");
  info.rng_streams = number("rng_streams");
  info.config = get("config");

  info.dtype = get("dtype");
  const auto type = dtype_from_name(info.dtype);
  if (!type || (*type != dtype::f32 && *type != dtype::f64))
    fail(what, ": checkpoint metadata \"dtype\" is '", info.dtype, "', expected 'F32' or 'F64'");

  const std::string& groups = get("groups");
  std::set<std::string> group_set;
  for (std::size_t b = 0; !groups.empty();) {
    const std::size_t e = std::min(groups.find(',', b), groups.size());
    std::string g = groups.substr(b, e - b);
    if (!valid_group_name(g) || !group_set.insert(g).second)
      fail(what, ": checkpoint metadata \"groups\" is '", groups, "': group names must be distinct, non-empty and "
           "free of '/'");
    info.groups.push_back(std::move(g));
    if (e == groups.size()) break;
    b = e + 1;
  }

  for (const std::string& name : names) {
    const std::size_t slash = name.find('/');
    if (slash == std::string::npos || !group_set.count(name.substr(0, slash)))
      fail(what, ": tensor '", name, "' belongs to no group of the checkpoint (groups: '", groups, "')");
    const tensor_entry& e = entry_of(name);
    if (e.type != *type)
      fail(what, ": tensor '", name, "' has dtype ", dtype_name(e.type), ", but the checkpoint's dtype is ",
           info.dtype);
  }

  for (const auto& [k, v] : md)
    if (!checkpoint_reserved(k)) info.extra.emplace(k, v);
  return info;
}

// ---------------------------------------------------------------------------------------
// Config comparison: both texts parsed as JSON and compared structurally (object key order,
// whitespace, escapes and number spelling do not matter); the first difference is reported by
// its key path ("hidden_size", "moe.num_experts", "betas[1]").
// ---------------------------------------------------------------------------------------

struct json_node {
  enum kind_t { null_v, bool_v, number_v, string_v, array_v, object_v } kind = null_v;
  std::string text;                 ///< number/literal source text, decoded string
  std::vector<std::string> keys;    ///< object keys, document order
  std::vector<json_node> children;  ///< object values (parallel to keys) or array elements
};

/// A small strict JSON parser for config texts; nullopt on anything invalid (duplicate keys
/// included) or nested deeper than 64 levels.
class json_reader {
 public:
  static std::optional<json_node> parse(std::string_view s) {
    if (invalid_utf8_at(s)) return std::nullopt;
    json_reader r(s);
    json_node n;
    r.ws_();
    if (!r.value_(n, 0)) return std::nullopt;
    r.ws_();
    if (r.i_ != s.size()) return std::nullopt;
    return n;
  }

 private:
  explicit json_reader(std::string_view s) : s_(s) {}
  bool end_() const { return i_ >= s_.size(); }
  void ws_() {
    while (!end_() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  static bool digit_(char c) { return c >= '0' && c <= '9'; }

  bool value_(json_node& n, int depth) {
    if (depth > max_json_depth || end_()) return false;
    const char c = s_[i_];
    if (c == '{') {
      ++i_;
      n.kind = json_node::object_v;
      ws_();
      if (!end_() && s_[i_] == '}') {
        ++i_;
        return true;
      }
      std::set<std::string> seen;
      for (;;) {
        ws_();
        std::string key;
        if (end_() || s_[i_] != '"' || !string_(key) || !seen.insert(key).second) return false;
        ws_();
        if (end_() || s_[i_] != ':') return false;
        ++i_;
        ws_();
        json_node child;
        if (!value_(child, depth + 1)) return false;
        n.keys.push_back(std::move(key));
        n.children.push_back(std::move(child));
        ws_();
        if (end_()) return false;
        if (s_[i_] == ',') {
          ++i_;
          continue;
        }
        if (s_[i_] == '}') {
          ++i_;
          return true;
        }
        return false;
      }
    }
    if (c == '[') {
      ++i_;
      n.kind = json_node::array_v;
      ws_();
      if (!end_() && s_[i_] == ']') {
        ++i_;
        return true;
      }
      for (;;) {
        ws_();
        json_node child;
        if (!value_(child, depth + 1)) return false;
        n.children.push_back(std::move(child));
        ws_();
        if (end_()) return false;
        if (s_[i_] == ',') {
          ++i_;
          continue;
        }
        if (s_[i_] == ']') {
          ++i_;
          return true;
        }
        return false;
      }
    }
    if (c == '"') {
      n.kind = json_node::string_v;
      return string_(n.text);
    }
    for (const std::string_view lit : {std::string_view("true"), std::string_view("false"), std::string_view("null")})
      if (s_.substr(i_, lit.size()) == lit) {
        n.kind = lit == "null" ? json_node::null_v : json_node::bool_v;
        n.text = std::string(lit);
        i_ += lit.size();
        return true;
      }
    if (c == '-' || digit_(c)) {
      const std::size_t start = i_;
      if (s_[i_] == '-') ++i_;
      if (end_() || !digit_(s_[i_])) return false;
      if (s_[i_] == '0') ++i_;
      else
        while (!end_() && digit_(s_[i_])) ++i_;
      if (!end_() && s_[i_] == '.') {
        ++i_;
        if (end_() || !digit_(s_[i_])) return false;
        while (!end_() && digit_(s_[i_])) ++i_;
      }
      if (!end_() && (s_[i_] == 'e' || s_[i_] == 'E')) {
        ++i_;
        if (!end_() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
        if (end_() || !digit_(s_[i_])) return false;
        while (!end_() && digit_(s_[i_])) ++i_;
      }
      n.kind = json_node::number_v;
      n.text = std::string(s_.substr(start, i_ - start));
      return true;
    }
    return false;
  }

  bool hex4_(std::uint32_t& v) {
    if (s_.size() - i_ < 4) return false;
    v = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<std::uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<std::uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<std::uint32_t>(h - 'A' + 10);
      else return false;
    }
    return true;
  }

  /// A string literal at '"', decoded.
  bool string_(std::string& out) {
    ++i_;
    for (;;) {
      if (end_()) return false;
      const char c = s_[i_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) return false;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (end_()) return false;
      const char e = s_[i_++];
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
          std::uint32_t cp;
          if (!hex4_(cp)) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            std::uint32_t lo;
            if (s_.substr(i_, 2) != "\\u") return false;
            i_ += 2;
            if (!hex4_(lo) || lo < 0xDC00 || lo > 0xDFFF) return false;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return false;
          }
          append_utf8(out, cp);
          break;
        }
        default: return false;
      }
    }
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

/// Equal numbers: integers (no fraction, no exponent) by their digits (so 2^64-scale values
/// compare exactly), anything else as doubles (1 == 1.0 == 1e0).
inline bool json_numbers_equal(const std::string& a, const std::string& b) {
  const auto is_int = [](const std::string& s) { return s.find_first_of(".eE") == std::string::npos; };
  const auto canon = [](std::string s) { return s == "-0" ? std::string("0") : s; };
  if (is_int(a) && is_int(b)) return canon(a) == canon(b);
  double x = 0, y = 0;
  const auto rx = std::from_chars(a.data(), a.data() + a.size(), x);
  const auto ry = std::from_chars(b.data(), b.data() + b.size(), y);
  if (rx.ec != std::errc() || ry.ec != std::errc()) return a == b;  // out of double range
  return x == y;
}

/// Compact JSON text of a node, shortened to about 80 characters for messages.
inline void json_show(const json_node& n, std::string& out) {
  if (out.size() > 80) return;
  switch (n.kind) {
    case json_node::string_v: append_json_string(out, n.text); return;
    case json_node::array_v:
      out += '[';
      for (std::size_t i = 0; i < n.children.size(); ++i) {
        if (i) out += ',';
        json_show(n.children[i], out);
      }
      out += ']';
      return;
    case json_node::object_v:
      out += '{';
      for (std::size_t i = 0; i < n.children.size(); ++i) {
        if (i) out += ',';
        append_json_string(out, n.keys[i]);
        out += ':';
        json_show(n.children[i], out);
      }
      out += '}';
      return;
    default: out += n.text; return;
  }
}

inline std::string json_show(const json_node* n) {
  if (!n) return "<missing>";
  std::string out;
  json_show(*n, out);
  if (out.size() > 80) out = out.substr(0, 77) + "...";
  return out;
}

struct json_difference {
  std::string path;
  std::string file, expected;
};

inline std::string json_child_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

/// The first difference between file and expected, in expected's document order (keys that
/// only the file has come last).
inline std::optional<json_difference> json_compare(const json_node& file, const json_node& expected,
                                                   const std::string& path) {
  const auto differ = [&](const std::string& p, const json_node* f, const json_node* e) {
    return std::optional<json_difference>(json_difference{p, json_show(f), json_show(e)});
  };
  if (file.kind != expected.kind) return differ(path, &file, &expected);
  switch (expected.kind) {
    case json_node::number_v:
      if (!json_numbers_equal(file.text, expected.text)) return differ(path, &file, &expected);
      return std::nullopt;
    case json_node::array_v:
      if (file.children.size() != expected.children.size()) return differ(path, &file, &expected);
      for (std::size_t i = 0; i < expected.children.size(); ++i)
        if (auto d = json_compare(file.children[i], expected.children[i], path + "[" + std::to_string(i) + "]"))
          return d;
      return std::nullopt;
    case json_node::object_v: {
      const auto find = [](const json_node& n, const std::string& key) -> const json_node* {
        for (std::size_t i = 0; i < n.keys.size(); ++i)
          if (n.keys[i] == key) return &n.children[i];
        return nullptr;
      };
      for (std::size_t i = 0; i < expected.keys.size(); ++i) {
        const std::string p = json_child_path(path, expected.keys[i]);
        const json_node* f = find(file, expected.keys[i]);
        if (!f) return differ(p, nullptr, &expected.children[i]);
        if (auto d = json_compare(*f, expected.children[i], p)) return d;
      }
      for (std::size_t i = 0; i < file.keys.size(); ++i)
        if (!find(expected, file.keys[i])) return differ(json_child_path(path, file.keys[i]), &file.children[i], nullptr);
      return std::nullopt;
    }
    default:
      if (file.text != expected.text) return differ(path, &file, &expected);
      return std::nullopt;
  }
}

/// Throws unless the stored config equals the expected one.
inline void check_checkpoint_config(const std::string& stored, const std::string& expected, const std::string& what) {
  if (stored == expected) return;
  const auto f = json_reader::parse(stored);
  const auto e = json_reader::parse(expected);
  if (f && e) {
    const auto d = json_compare(*f, *e, "");
    if (!d) return;
    if (d->path.empty())
      fail(what, ": config differs (file: ", d->file, ", expected: ", d->expected, ")");
    fail(what, ": config differs at '", d->path, "' (file: ", d->file, ", expected: ", d->expected, ")");
  }
  std::size_t at = 0;
  while (at < stored.size() && at < expected.size() && stored[at] == expected[at]) ++at;
  const auto excerpt = [&](const std::string& s) {
    const std::size_t b = at > 20 ? at - 20 : 0;
    std::string out;
    append_json_string(out, s.substr(b, 40));
    return out;
  };
  fail(what, ": config differs from the expected config (compared as text because ",
       !f && !e ? "neither is" : !f ? "the file's config is not" : "the expected config is not",
       " valid JSON; first difference at byte ", at, ": file ", excerpt(stored), ", expected ", excerpt(expected), ")");
}

/// Checks the group lists (float and bf16) of a save or load: valid group names, distinct over
/// both lists; distinct, non-empty
/// tensor names; non-negative shapes; a value pointer wherever there are elements.
template <class T, class B>
void check_groups(const std::vector<checkpoint_group<T, B>>& groups,
                  const std::vector<checkpoint_group<bf16, B>>& bf16_groups, const char* fn) {
  std::set<std::string> names;
  const auto check = [&](const auto& g) {
    PROMOE_CHECK(valid_group_name(g.name), fn, ": group name '", g.name,
                 "' must be non-empty and contain neither '/' nor ','");
    PROMOE_CHECK(names.insert(g.name).second, fn, ": group '", g.name, "' appears twice");
    std::set<std::string> tensor_names;
    for (const auto& p : g.tensors) {
      PROMOE_CHECK(!p.name.empty(), fn, ": group '", g.name, "' has a tensor with an empty name");
      PROMOE_CHECK(tensor_names.insert(p.name).second, fn, ": tensor '", p.name, "' appears twice in group '", g.name,
                   "'");
      for (const index_t d : p.shape)
        PROMOE_CHECK(d >= 0, fn, ": tensor '", g.name, "/", p.name, "' has a negative dimension in shape ",
                     ::promoe::detail::shape_string(p.shape));
      PROMOE_CHECK(p.size() == 0 || p.value != nullptr, fn, ": tensor '", g.name, "/", p.name,
                   "' has a null value pointer");
    }
  };
  for (const auto& g : groups) check(g);
  for (const auto& g : bf16_groups) check(g);
}

}  // namespace detail

/// Removes the temporary files that interrupted saves of path left behind
/// ("<file>.tmp.<pid>.<n>" next to it) whose writer process no longer exists on this machine;
/// returns how many it removed. Files of running processes (this one included) are kept.
/// save_checkpoint calls it after each successful save. Caveat: a process of another machine
/// (or PID namespace) that writes the same path on a shared file system looks dead from here.
/// POSIX only; elsewhere it removes nothing.
inline std::size_t remove_stale_temp_files(const std::string& path) {
#if defined(_WIN32)
  (void)path;
  return 0;
#else
  namespace fs = std::filesystem;
  const fs::path target(path);
  if (!target.has_filename()) return 0;
  const std::string prefix = target.filename().string() + ".tmp.";
  const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  std::error_code ec;
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    const std::size_t dot = rest.find('.');
    if (dot == std::string::npos) continue;
    const auto pid = detail::parse_u64(std::string_view(rest).substr(0, dot));
    const auto n = detail::parse_u64(std::string_view(rest).substr(dot + 1));
    if (!pid || !n || *pid == 0 || *pid > static_cast<std::uint64_t>(std::numeric_limits<::pid_t>::max())) continue;
    const auto p = static_cast<::pid_t>(*pid);
    if (p == ::getpid()) continue;
    if (::kill(p, 0) == 0 || errno != ESRCH) continue;  // running (or not ours to signal): keep
    std::error_code rm;
    if (it->is_regular_file(rm) && !rm) stale.push_back(it->path());
  }
  std::size_t removed = 0;
  for (const auto& p : stale) {
    std::error_code rm;
    if (fs::remove(p, rm)) ++removed;
  }
  return removed;
#endif
}

/// Writes the groups and the info to path atomically (see the file comment). The info's
/// dtype and groups are ignored (they come from T and the groups); extra keys must not be
/// reserved ones. Every check runs before anything is written: on an error, the file at path
/// keeps its previous contents and no temporary file remains.
template <class T, class B>
void save_checkpoint(const std::string& path, const std::vector<checkpoint_group<T, B>>& groups,
                     const checkpoint_info& info, const std::vector<checkpoint_group<bf16, B>>& bf16_groups = {}) {
  constexpr dtype type = detail::checkpoint_dtype<T>();
  detail::check_groups(groups, bf16_groups, "save_checkpoint");
  for (const auto& [k, v] : info.extra)
    PROMOE_CHECK(!detail::checkpoint_reserved(k), "save_checkpoint: extra metadata key '", k,
                 "' is reserved (format, version, dtype, groups, step, rng_seed, rng_streams, config)");

  safetensors_writer w;
  std::string group_list;
  std::vector<T> host;
  std::vector<bf16> half;
  const auto save_group = [&](const auto& g) {
    group_list += (group_list.empty() ? "" : ",") + g.name;
    for (const auto& p : g.tensors) {
      const index_t n = p.size();
      if constexpr (std::is_same_v<std::remove_pointer_t<decltype(p.value)>, bf16>) {
        half.resize(static_cast<std::size_t>(n));
        if (n > 0) backend_traits<B>::copy_to_host(p.value, n, half.data());
        host.assign(half.begin(), half.end());  // widened: exact
      } else {
        host.resize(static_cast<std::size_t>(n));
        if (n > 0) backend_traits<B>::copy_to_host(p.value, n, host.data());
      }
      w.add(g.name + "/" + p.name, type, std::vector<std::int64_t>(p.shape.begin(), p.shape.end()), host.data());
    }
  };
  for (const auto& g : groups) save_group(g);
  for (const auto& g : bf16_groups) save_group(g);
  host = {};
  half = {};
  w.set_metadata("format", std::string(checkpoint_format));
  w.set_metadata("version", std::string(checkpoint_version));
  w.set_metadata("dtype", std::string(dtype_name(type)));
  w.set_metadata("groups", group_list);
  w.set_metadata("step", std::to_string(info.step));
  w.set_metadata("rng_seed", std::to_string(info.rng_seed));
  w.set_metadata("rng_streams", std::to_string(info.rng_streams));
  w.set_metadata("config", info.config);
  for (const auto& [k, v] : info.extra) w.set_metadata(k, v);
  w.write(path);
  try {
    remove_stale_temp_files(path);  // best effort: the checkpoint is already saved
  } catch (...) {
  }
}

/// The checkpoint's info (metadata validated: format, version, numbers, dtype, groups, and
/// every tensor in a listed group with the checkpoint's dtype) without reading tensor data.
inline checkpoint_info read_checkpoint_info(const std::string& path) {
  const detail::checkpoint_header h = detail::read_safetensors_header(path);
  std::vector<std::string> names;
  names.reserve(h.tensors.size());
  for (const auto& kv : h.tensors) names.push_back(kv.first);
  return detail::checkpoint_info_from(
      h.metadata, names, [&](const std::string& n) -> const tensor_entry& { return h.tensors.at(n); }, path);
}

/// Loads the listed groups into their tensors and returns the checkpoint's info. Everything
/// is checked before any destination is written (see the file comment), so on a
/// promoe::error the destinations keep their values. Groups of the file that are not listed
/// are ignored (load just "ema" for inference, say); a listed group must exist in the file
/// and match its tensors one to one, names and shapes. The config check compares
/// expected_config with the stored config as JSON.
template <class T, class B>
checkpoint_info load_checkpoint(const std::string& path, const std::vector<checkpoint_group<T, B>>& groups,
                                const std::string& expected_config,
                                const std::vector<checkpoint_group<bf16, B>>& bf16_groups = {}) {
  constexpr dtype type = detail::checkpoint_dtype<T>();
  detail::check_groups(groups, bf16_groups, "load_checkpoint");
  const safetensors_file file = safetensors_file::read(path);
  checkpoint_info info = detail::checkpoint_info_from(
      file.metadata(), file.names(), [&](const std::string& n) -> const tensor_entry& { return file.at(n); }, path);

  if (info.dtype != dtype_name(type))
    fail(path, ": checkpoint holds ", info.dtype, " tensors (saved from ",
         detail::checkpoint_type_name(*detail::dtype_from_name(info.dtype)), "), but this load reads ",
         dtype_name(type), " (", detail::checkpoint_type_name(type), ")");
  detail::check_checkpoint_config(info.config, expected_config, path);

  // Which file tensors each listed group has.
  std::map<std::string, std::set<std::string>> in_file;
  const auto list_group = [&](const auto& g) {
    if (std::find(info.groups.begin(), info.groups.end(), g.name) == info.groups.end()) {
      std::string have;
      for (const auto& x : info.groups) have += (have.empty() ? "'" : ", '") + x + "'";
      fail(path, ": the checkpoint has no group '", g.name, "' (it has ", have.empty() ? std::string("none") : have,
           ")");
    }
    in_file[g.name];
  };
  for (const auto& g : groups) list_group(g);
  for (const auto& g : bf16_groups) list_group(g);
  for (const auto& n : file.names()) {
    const std::string g = n.substr(0, n.find('/'));
    if (const auto it = in_file.find(g); it != in_file.end()) it->second.insert(n.substr(g.size() + 1));
  }
  const auto check_group = [&](const auto& g) {
    std::set<std::string> expected;
    for (const auto& p : g.tensors) {
      const std::string full = g.name + "/" + p.name;
      if (!file.contains(full))
        fail(path, ": tensor '", full, "' is missing from the checkpoint (its group '", g.name, "' has ",
             in_file[g.name].size(), " tensors)");
      const tensor_entry& e = file.at(full);
      const std::vector<std::int64_t> want(p.shape.begin(), p.shape.end());
      if (e.shape != want)
        fail(path, ": tensor '", full, "' has shape ", ::promoe::detail::shape_string(e.shape),
             " in the checkpoint, expected ", ::promoe::detail::shape_string(want));
      expected.insert(p.name);
    }
    const auto& have = in_file[g.name];
    std::size_t unexpected = 0;
    std::string first;
    for (const auto& n : have)
      if (!expected.count(n) && unexpected++ == 0) first = n;
    if (unexpected)
      fail(path, ": the checkpoint's tensor '", g.name, "/", first, "' is not expected in group '", g.name, "' (",
           unexpected, " unexpected tensor", unexpected == 1 ? "" : "s", " in the group)");
  };
  for (const auto& g : groups) check_group(g);
  for (const auto& g : bf16_groups) check_group(g);

  // Everything checked: copy into the destinations (through an aligned host buffer; bf16
  // destinations get the values rounded, exact for values saved from bf16).
  std::vector<T> host;
  std::vector<bf16> half;
  const auto load_group = [&](const auto& g) {
    for (const auto& p : g.tensors) {
      const index_t n = p.size();
      if (n == 0) continue;
      const auto bytes = file.data(g.name + "/" + p.name);
      host.resize(static_cast<std::size_t>(n));
      std::memcpy(host.data(), bytes.data(), bytes.size());
      if constexpr (std::is_same_v<std::remove_pointer_t<decltype(p.value)>, bf16>) {
        half.assign(host.begin(), host.end());
        backend_traits<B>::copy_from_host(half.data(), n, p.value);
      } else {
        backend_traits<B>::copy_from_host(host.data(), n, p.value);
      }
    }
  };
  for (const auto& g : groups) load_group(g);
  for (const auto& g : bf16_groups) load_group(g);
  return info;
}

}  // namespace promoe::io
