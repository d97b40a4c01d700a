// SPDX-License-Identifier: Apache-2.0
/// \file idx.hpp
/// \brief Reading IDX files (the format of MNIST and Fashion-MNIST), plain or gzip-compressed,
/// and loading a labelled image set from an images file and a labels file.
///
/// Layout: a 4-byte magic 00 00 <type> <rank>, rank big-endian u32 dimensions, then the data in
/// row-major order. Only unsigned bytes (type 0x08) are read. A file that starts with the gzip
/// magic 1f 8b is decompressed on the fly with zlib (several concatenated gzip members are
/// accepted, as gunzip does). Everything is validated: a missing file, a wrong magic, an
/// unsupported type, a header or data shorter than declared, bytes after the declared data, and
/// gzip corruption (bad header, bad deflate data, CRC-32 or length mismatch, truncation) are each
/// a promoe::error naming the file and the problem.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <zlib.h>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::io {

/// An IDX array of unsigned bytes: its dimensions and its data, row-major.
struct idx_array {
  std::vector<index_t> dims;
  std::vector<std::uint8_t> bytes;

  index_t numel() const { return static_cast<index_t>(bytes.size()); }
};

/// A labelled image set: pixels[((n * H + y) * W + x) * C + c], labels[n] in [0, K).
/// class_names (K names, label k is class_names[k]) is empty when the source names no classes
/// (load_idx_dataset).
struct labelled_images {
  index_t N = 0, H = 0, W = 0, C = 1;
  std::vector<std::uint8_t> pixels;
  std::vector<std::int64_t> labels;
  std::vector<std::string> class_names;

  /// The H * W * C bytes of image n.
  std::span<const std::uint8_t> image(index_t n) const {
    PROMOE_CHECK(n >= 0 && n < N, "labelled_images::image: index ", n, " out of range [0, ", N, ")");
    const auto size = static_cast<std::size_t>(H * W * C);
    return std::span<const std::uint8_t>(pixels).subspan(static_cast<std::size_t>(n) * size, size);
  }
};

namespace detail {

inline std::string idx_errno_message(int err) { return std::error_code(err, std::generic_category()).message(); }

inline const char* idx_type_name(unsigned type) {
  switch (type) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return nullptr;
  }
}

inline std::string hex_byte(unsigned b) {
  static constexpr char hex[] = "0123456789abcdef";
  return std::string("0x") + hex[(b >> 4) & 0xf] + hex[b & 0xf];
}

/// The bytes of a file, gunzipped on the fly when it starts with 1f 8b. read() returns fewer
/// bytes than asked only at the end of the (decompressed) data; gzip corruption throws.
class maybe_gzip_source {
 public:
  explicit maybe_gzip_source(const std::string& path) : path_(path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::file_status st = fs::status(path, ec);
    if (ec || !fs::exists(st)) fail(path, ": no such file");
    if (fs::is_directory(st)) fail(path, ": is a directory, not a file");
    in_.open(path, std::ios::binary);
    if (!in_) fail(path, ": cannot open for reading (", idx_errno_message(errno), ")");
    file_size_ = fs::file_size(path, ec);
    if (ec) fail(path, ": cannot determine the file size (", ec.message(), ")");
    char magic[2] = {0, 0};
    in_.read(magic, 2);
    const auto n = in_.gcount();
    in_.clear();
    in_.seekg(0);
    gz_ = n == 2 && static_cast<unsigned char>(magic[0]) == 0x1f && static_cast<unsigned char>(magic[1]) == 0x8b;
    if (gz_) {
      inbuf_.resize(std::size_t{1} << 16);
      const int r = inflateInit2(&zs_, 15 + 16);  // gzip wrapper only: checks its CRC-32 and length
      if (r != Z_OK) fail(path, ": cannot initialise zlib (", zs_.msg ? zs_.msg : "error", ")");
      z_open_ = true;
    }
  }
  maybe_gzip_source(const maybe_gzip_source&) = delete;
  maybe_gzip_source& operator=(const maybe_gzip_source&) = delete;
  ~maybe_gzip_source() {
    if (z_open_) inflateEnd(&zs_);
  }

  bool gzip() const { return gz_; }
  std::uint64_t file_size() const { return file_size_; }

  /// Up to n bytes into dst; fewer only at the end of the data.
  std::size_t read(std::uint8_t* dst, std::size_t n) {
    std::size_t got = 0;
    if (!gz_) {
      while (got < n) {
        const std::size_t want = std::min<std::size_t>(n - got, std::size_t{1} << 30);
        in_.read(reinterpret_cast<char*>(dst + got), static_cast<std::streamsize>(want));
        const auto g = static_cast<std::size_t>(in_.gcount());
        got += g;
        if (g < want) break;
      }
      if (in_.bad()) fail(path_, ": read error (", idx_errno_message(errno), ")");
      return got;
    }
    while (got < n) {
      if (zs_.avail_in == 0 && !eof_) refill_();
      if (zs_.avail_in == 0) {
        if (member_done_) return got;  // the last member ended cleanly at the end of the file
        if (members_ > 0 && zs_.total_in > 0)
          fail(path_, ": corrupt gzip file: ", zs_.total_in,
               " bytes after the end of the gzip stream that are not a complete gzip member");
        fail(path_, ": corrupt gzip file: the compressed stream ends early (truncated file?)");
      }
      if (member_done_) {  // more input after a member: it must be another gzip member
        inflateReset(&zs_);
        member_done_ = false;
        ++members_;
      }
      const std::size_t want = std::min<std::size_t>(n - got, UINT_MAX);
      zs_.next_out = reinterpret_cast<Bytef*>(dst + got);
      zs_.avail_out = static_cast<uInt>(want);
      const int r = inflate(&zs_, Z_NO_FLUSH);
      got += want - zs_.avail_out;
      if (r == Z_STREAM_END) {
        member_done_ = true;
      } else if (r == Z_DATA_ERROR && members_ > 0 && zs_.total_out == 0) {
        fail(path_, ": corrupt gzip file: bytes after the end of the gzip stream that are not a gzip member (",
             zs_.msg ? zs_.msg : "invalid header", ")");
      } else if (r == Z_DATA_ERROR || r == Z_NEED_DICT || r == Z_STREAM_ERROR) {
        fail(path_, ": corrupt gzip file (zlib: ", zs_.msg ? zs_.msg : "invalid data", ")");
      } else if (r == Z_MEM_ERROR) {
        fail(path_, ": out of memory while decompressing");
      }
      // Z_OK, or Z_BUF_ERROR (no input left: refilled on the next turn)
    }
    return got;
  }

 private:
  void refill_() {
    in_.read(reinterpret_cast<char*>(inbuf_.data()), static_cast<std::streamsize>(inbuf_.size()));
    const auto g = static_cast<std::size_t>(in_.gcount());
    if (in_.bad()) fail(path_, ": read error (", idx_errno_message(errno), ")");
    if (g < inbuf_.size()) eof_ = true;
    zs_.next_in = inbuf_.data();
    zs_.avail_in = static_cast<uInt>(g);
  }

  std::string path_;
  std::ifstream in_;
  std::uint64_t file_size_ = 0;
  bool gz_ = false;
  bool z_open_ = false;
  bool eof_ = false;
  bool member_done_ = false;
  int members_ = 0;
  z_stream zs_{};
  std::vector<unsigned char> inbuf_;
};

/// Deflate expands at most ~1032:1, so a gzip file of n bytes holds less than this.
inline std::uint64_t gzip_capacity(std::uint64_t n) {
  return n > std::numeric_limits<std::uint64_t>::max() / 1100 ? std::numeric_limits<std::uint64_t>::max()
                                                              : n * 1100 + 4096;
}

inline std::string dims_string(const std::vector<index_t>& dims) { return ::promoe::detail::shape_string(dims); }

}  // namespace detail

/// Reads an IDX file of unsigned bytes (any rank >= 1), plain or gzip-compressed.
inline idx_array read_idx(const std::string& path) {
  detail::maybe_gzip_source src(path);
  const char* kind = src.gzip() ? " (after gunzip)" : "";
  std::uint8_t magic[4];
  const std::size_t got_magic = src.read(magic, 4);
  if (got_magic < 4)
    fail(path, ": truncated IDX header: ", got_magic, " bytes", kind, ", the magic number needs 4");
  if (magic[0] != 0 || magic[1] != 0)
    fail(path, ": not an IDX file: magic bytes ", detail::hex_byte(magic[0]), " ", detail::hex_byte(magic[1]), " ",
         detail::hex_byte(magic[2]), " ", detail::hex_byte(magic[3]), ", expected 0x00 0x00 <type> <rank>");
  const char* type_name = detail::idx_type_name(magic[2]);
  if (!type_name)
    fail(path, ": not an IDX file: unknown type code ", detail::hex_byte(magic[2]), " in the magic number");
  if (magic[2] != 0x08)
    fail(path, ": IDX data type ", type_name, " (", detail::hex_byte(magic[2]),
         ") is not supported; only unsigned byte (0x08) is read");
  const unsigned rank = magic[3];
  if (rank == 0) fail(path, ": IDX header declares 0 dimensions");

  std::vector<std::uint8_t> raw(4 * std::size_t{rank});
  const std::size_t got_dims = src.read(raw.data(), raw.size());
  if (got_dims < raw.size())
    fail(path, ": truncated IDX header: ", rank, " dimensions need ", raw.size(), " bytes after the magic, the file",
         kind, " ends after ", got_dims);
  idx_array out;
  out.dims.resize(rank);
  std::uint64_t count = 1;
  bool overflow = false;
  for (unsigned i = 0; i < rank; ++i) {
    const std::uint32_t d = (std::uint32_t{raw[4 * i]} << 24) | (std::uint32_t{raw[4 * i + 1]} << 16) |
                            (std::uint32_t{raw[4 * i + 2]} << 8) | std::uint32_t{raw[4 * i + 3]};
    out.dims[i] = static_cast<index_t>(d);
    if (d != 0 && count > std::numeric_limits<std::uint64_t>::max() / d) overflow = true;
    count = overflow ? count : count * d;
  }
  if (std::find(out.dims.begin(), out.dims.end(), index_t{0}) != out.dims.end()) {
    count = 0;
    overflow = false;
  }
  const std::uint64_t header = 4 + raw.size();
  if (overflow || count > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()))
    fail(path, ": IDX dimensions ", detail::dims_string(out.dims), " are too large");
  if (!src.gzip() && count > src.file_size() - header)
    fail(path, ": truncated IDX data: dimensions ", detail::dims_string(out.dims), " need ", count,
         " bytes after the ", header, "-byte header, the file has ", src.file_size() - header);
  if (src.gzip() && count > detail::gzip_capacity(src.file_size()))
    fail(path, ": truncated or corrupt: dimensions ", detail::dims_string(out.dims), " need ", count,
         " bytes, more than a gzip file of ", src.file_size(), " bytes can hold");
  if (count > std::numeric_limits<std::size_t>::max() / 2)
    fail(path, ": IDX data of ", count, " bytes does not fit in memory");
  out.bytes.resize(static_cast<std::size_t>(count));
  const std::size_t got = src.read(out.bytes.data(), out.bytes.size());
  if (got < out.bytes.size())
    fail(path, ": truncated IDX data: dimensions ", detail::dims_string(out.dims), " need ", count,
         " bytes after the header, the file", kind, " has ", got);
  std::uint8_t extra[4096];
  std::uint64_t trailing = 0;
  for (;;) {
    const std::size_t g = src.read(extra, sizeof extra);
    trailing += g;
    if (g < sizeof extra || trailing >= (std::uint64_t{1} << 20)) break;
  }
  if (trailing > 0)
    fail(path, ": trailing data: ", trailing >= (std::uint64_t{1} << 20) ? "over " : "", trailing,
         " bytes after the ", count, " bytes of data that dimensions ", detail::dims_string(out.dims), " declare");
  return out;
}

/// An image set from an IDX images file [N, H, W] and an IDX labels file [N] (unsigned bytes,
/// plain or gzip). C is 1 and class_names is empty. Errors name the file: wrong ranks, empty
/// images, and images and labels whose counts disagree.
inline labelled_images load_idx_dataset(const std::string& images_path, const std::string& labels_path) {
  idx_array images = read_idx(images_path);
  if (images.dims.size() != 3)
    fail(images_path, ": images must have 3 dimensions [N, H, W], the file has ", images.dims.size(), ": ",
         detail::dims_string(images.dims));
  if (images.dims[0] == 0 || images.dims[1] == 0 || images.dims[2] == 0)
    fail(images_path, ": the file holds no pixels (dimensions ", detail::dims_string(images.dims), ")");
  const idx_array labels = read_idx(labels_path);
  if (labels.dims.size() != 1)
    fail(labels_path, ": labels must have 1 dimension [N], the file has ", labels.dims.size(), ": ",
         detail::dims_string(labels.dims));
  if (labels.dims[0] != images.dims[0])
    fail(labels_path, ": holds ", labels.dims[0], " labels but '", images_path, "' holds ", images.dims[0],
         " images");
  labelled_images out;
  out.N = images.dims[0];
  out.H = images.dims[1];
  out.W = images.dims[2];
  out.C = 1;
  out.pixels = std::move(images.bytes);
  out.labels.assign(labels.bytes.begin(), labels.bytes.end());
  return out;
}

/// Where Debian's dataset-fashion-mnist package installs the four files.
inline std::string fashion_mnist_default_dir() { return "/usr/share/datasets/fashion-mnist"; }

/// The ten Fashion-MNIST classes; label k is fashion_mnist_classes()[k].
inline const std::array<std::string_view, 10>& fashion_mnist_classes() {
  static constexpr std::array<std::string_view, 10> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                             "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

/// The Fashion-MNIST training (60000 images) or test (10000) split from dir:
/// {train,t10k}-{images-idx3,labels-idx1}-ubyte, with or without ".gz". Labels are checked to
/// lie in [0, 10) and class_names is set.
inline labelled_images load_fashion_mnist(bool train = true, const std::string& dir = fashion_mnist_default_dir()) {
  namespace fs = std::filesystem;
  const std::string split = train ? "train" : "t10k";
  const auto find = [&](const std::string& stem) {
    const fs::path base = fs::path(dir) / stem;
    std::error_code ec;
    fs::path gz = base;
    gz += ".gz";
    if (fs::exists(gz, ec)) return gz.string();
    if (fs::exists(base, ec)) return base.string();
    fail("load_fashion_mnist: neither '", gz.string(), "' nor '", base.string(),
         "' exists (on Debian: apt-get install dataset-fashion-mnist)");
  };
  const std::string images_path = find(split + "-images-idx3-ubyte");
  const std::string labels_path = find(split + "-labels-idx1-ubyte");
  labelled_images out = load_idx_dataset(images_path, labels_path);
  for (std::size_t i = 0; i < out.labels.size(); ++i)
    if (out.labels[i] >= 10)
      fail(labels_path, ": label ", out.labels[i], " of image ", i, " is not a Fashion-MNIST class (0..9)");
  for (const auto name : fashion_mnist_classes()) out.class_names.emplace_back(name);
  return out;
}

}  // namespace promoe::io
