// SPDX-License-Identifier: Apache-2.0
/// \file png.hpp
/// \brief PNG files: an 8-bit encoder of its own (zlib for the compression and the CRCs; no
/// third-party code, so nothing to define in one translation unit), a validating decoder (chunk
/// structure, CRC-32s and the zlib stream checked here, pixels decoded by stb_image), and
/// image_grid, which tiles images into one picture the way torchvision's make_grid does.
///
/// stb_image is compiled into every translation unit that includes this header with
/// STB_IMAGE_STATIC (all its functions static, so there is no ODR issue) and only its PNG
/// decoder (STBI_ONLY_PNG, STBI_NO_STDIO). A translation unit that includes this header must
/// not also include stb_image.h configured otherwise, nor define STB_IMAGE_IMPLEMENTATION: stb's
/// include guard would mix the two configurations. Debian: libstb-dev (<stb/stb_image.h>);
/// elsewhere <stb_image.h> on the include path.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <zlib.h>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "atomic_file.hpp"

// stb_image's own headers first, so that nothing of theirs lands inside the pragma region.
#include <assert.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(STBI_INCLUDE_STB_IMAGE_H) && !defined(PROMOE_STB_IMAGE_INCLUDED)
#error "promoe/io/png.hpp compiles its own static copy of stb_image: include it before stb_image.h, or not both"
#endif
#ifndef PROMOE_STB_IMAGE_INCLUDED
#define PROMOE_STB_IMAGE_INCLUDED 1
#if defined(__clang__)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunused-function"
#pragma clang diagnostic ignored "-Wsign-compare"
#pragma clang diagnostic ignored "-Wunused-parameter"
#pragma clang diagnostic ignored "-Wunused-but-set-variable"
#pragma clang diagnostic ignored "-Wimplicit-fallthrough"
#pragma clang diagnostic ignored "-Wmissing-field-initializers"
#pragma clang diagnostic ignored "-Wcast-qual"
#pragma clang diagnostic ignored "-Wold-style-cast"
#pragma clang diagnostic ignored "-Wconversion"
#pragma clang diagnostic ignored "-Wshadow"
#pragma clang diagnostic ignored "-Wdouble-promotion"
#pragma clang diagnostic ignored "-Wzero-as-null-pointer-constant"
#elif defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wcast-qual"
#pragma GCC diagnostic ignored "-Wold-style-cast"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wsign-conversion"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#pragma GCC diagnostic ignored "-Wuseless-cast"
#pragma GCC diagnostic ignored "-Wzero-as-null-pointer-constant"
#elif defined(_MSC_VER)
#pragma warning(push, 0)
#endif
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_NO_STDIO
#define STBI_NO_LINEAR
#define STBI_NO_HDR
#if __has_include(<stb/stb_image.h>)
#include <stb/stb_image.h>
#elif __has_include(<stb_image.h>)
#include <stb_image.h>
#else
#error "promoe/io/png.hpp needs stb_image.h (Debian: apt-get install libstb-dev)"
#endif
#undef STB_IMAGE_STATIC
#undef STB_IMAGE_IMPLEMENTATION
#undef STBI_ONLY_PNG
#undef STBI_NO_STDIO
#undef STBI_NO_LINEAR
#undef STBI_NO_HDR
#if defined(__clang__)
#pragma clang diagnostic pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#elif defined(_MSC_VER)
#pragma warning(pop)
#endif
#endif  // PROMOE_STB_IMAGE_INCLUDED

namespace promoe::io {

/// An 8-bit image: pixels[(y * W + x) * C + c]; C is 1 (gray), 2 (gray + alpha), 3 (RGB) or
/// 4 (RGBA).
struct image {
  index_t H = 0, W = 0, C = 0;
  std::vector<std::uint8_t> pixels;
};

namespace detail {

inline constexpr unsigned char png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
inline constexpr std::uint32_t png_max_dim = 0x7fffffffu;  // the PNG spec's limit for width, height, lengths

inline void put_be32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}

inline std::uint32_t get_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
}

/// CRC-32 (zlib) of any length.
inline std::uint32_t crc32_of(std::uint32_t crc, const std::uint8_t* p, std::size_t n) {
  uLong c = crc;
  while (n > 0) {
    const auto k = static_cast<uInt>(std::min<std::size_t>(n, 1u << 30));
    c = ::crc32(c, p, k);
    p += k;
    n -= k;
  }
  return static_cast<std::uint32_t>(c);
}

/// length, type, data, CRC-32 of type + data.
inline void put_png_chunk(std::vector<std::uint8_t>& out, const char (&type)[5], const std::uint8_t* data,
                          std::size_t n) {
  put_be32(out, static_cast<std::uint32_t>(n));
  const std::size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  if (n) out.insert(out.end(), data, data + n);
  put_be32(out, crc32_of(0, out.data() + start, 4 + n));
}

inline int paeth(int a, int b, int c) {
  const int p = a + b - c;
  const int pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

/// The filtered scanlines: per row the filter (None, Sub, Up, Average, Paeth) whose output has
/// the smallest sum of absolute values as signed bytes (the heuristic the PNG spec suggests).
inline std::vector<std::uint8_t> png_filter(const std::uint8_t* px, std::size_t H, std::size_t row, std::size_t bpp) {
  std::vector<std::uint8_t> out((row + 1) * H);
  std::vector<std::uint8_t> trial(row);
  std::vector<std::uint8_t> best(row);
  for (std::size_t y = 0; y < H; ++y) {
    const std::uint8_t* cur = px + y * row;
    const std::uint8_t* prev = y ? cur - row : nullptr;
    long best_cost = std::numeric_limits<long>::max();
    int best_filter = 0;
    for (int f = 0; f < 5; ++f) {
      long cost = 0;
      for (std::size_t i = 0; i < row; ++i) {
        const int x = cur[i];
        const int a = i >= bpp ? cur[i - bpp] : 0;
        const int b = prev ? prev[i] : 0;
        const int c = (prev && i >= bpp) ? prev[i - bpp] : 0;
        int v = x;
        switch (f) {
          case 1: v = x - a; break;
          case 2: v = x - b; break;
          case 3: v = x - (a + b) / 2; break;
          case 4: v = x - paeth(a, b, c); break;
          default: break;
        }
        const auto byte = static_cast<std::uint8_t>(v & 0xff);
        trial[i] = byte;
        cost += byte < 128 ? byte : 256 - byte;
      }
      if (cost < best_cost) {
        best_cost = cost;
        best_filter = f;
        best.swap(trial);
      }
    }
    out[y * (row + 1)] = static_cast<std::uint8_t>(best_filter);
    std::copy(best.begin(), best.end(), out.begin() + static_cast<std::ptrdiff_t>(y * (row + 1) + 1));
  }
  return out;
}

/// Bytes per scanline (without the filter byte) of a w-pixel row.
inline std::uint64_t png_row_bytes(std::uint64_t w, unsigned channels, unsigned depth) {
  return (w * channels * depth + 7) / 8;
}

inline unsigned png_channels(unsigned color_type) {
  switch (color_type) {
    case 0: return 1;
    case 2: return 3;
    case 3: return 1;
    case 4: return 2;
    case 6: return 4;
    default: return 0;
  }
}

/// Size of the filtered scanlines that IHDR implies (the seven Adam7 passes when interlaced).
inline std::uint64_t png_data_size(std::uint32_t width, std::uint32_t height, unsigned color, unsigned depth,
                                   unsigned interlace) {
  const unsigned ch = png_channels(color);
  std::uint64_t expected = 0;
  if (interlace == 0) {
    expected = std::uint64_t{height} * (1 + png_row_bytes(width, ch, depth));
  } else {
    static constexpr unsigned x0[7] = {0, 4, 0, 2, 0, 1, 0}, y0[7] = {0, 0, 4, 0, 2, 0, 1};
    static constexpr unsigned dx[7] = {8, 8, 4, 4, 2, 2, 1}, dy[7] = {8, 8, 8, 4, 4, 2, 2};
    for (int p = 0; p < 7; ++p) {
      const std::uint64_t w = width > x0[p] ? (std::uint64_t{width} - x0[p] + dx[p] - 1) / dx[p] : 0;
      const std::uint64_t h = height > y0[p] ? (std::uint64_t{height} - y0[p] + dy[p] - 1) / dy[p] : 0;
      if (w && h) expected += h * (1 + png_row_bytes(w, ch, depth));
    }
  }
  return expected;
}

/// What check_png learnt about a file.
struct png_info {
  std::uint32_t width = 0, height = 0;
  unsigned depth = 0, color = 0, interlace = 0;
  std::size_t plte_at = 0;   // offset of the PLTE chunk (its length field), 0 if none
  std::size_t plte_len = 0;  // bytes of palette
};

/// Checks a whole PNG file: signature, every chunk's length and CRC-32, IHDR first and valid,
/// PLTE where a palette image needs it, consecutive IDATs whose zlib stream is complete, has a
/// valid Adler-32 and inflates to exactly the size IHDR implies, IEND last and nothing after it.
inline png_info check_png(std::span<const std::uint8_t> b, const std::string& what) {
  png_info info;
  if (b.size() < 8 || std::memcmp(b.data(), png_signature, 8) != 0) fail(what, ": not a PNG file (no PNG signature)");
  std::size_t pos = 8;
  std::uint32_t width = 0, height = 0;
  unsigned depth = 0, color = 0, interlace = 0;
  bool seen_plte = false, seen_iend = false, idat_done = false;
  std::size_t n_idat = 0;
  z_stream zs{};
  if (inflateInit(&zs) != Z_OK) fail(what, ": cannot initialise zlib");
  struct z_end {
    z_stream& z;
    ~z_end() { inflateEnd(&z); }
  } z_guard{zs};
  bool z_done = false;
  std::uint64_t inflated = 0, expected = 0;
  std::vector<std::uint8_t> sink(std::size_t{1} << 16);
  std::size_t chunk_no = 0;
  while (!seen_iend) {
    if (b.size() - pos < 12)
      fail(what, ": truncated PNG: chunk ", chunk_no, " at byte ", pos, " needs 12 bytes of length, type and CRC, ",
           b.size() - pos, " left (missing IEND?)");
    const std::uint32_t len = get_be32(b.data() + pos);
    const std::uint8_t* type = b.data() + pos + 4;
    std::string tname;
    for (int k = 0; k < 4; ++k) {
      const char c = static_cast<char>(type[k]);
      if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')))
        fail(what, ": corrupt PNG: chunk ", chunk_no, " at byte ", pos, " has an invalid type (byte ", int{type[k]}, ")");
      tname += c;
    }
    if (len > png_max_dim) fail(what, ": corrupt PNG: chunk '", tname, "' declares length ", len);
    if (b.size() - pos - 12 < len)
      fail(what, ": truncated PNG: chunk '", tname, "' at byte ", pos, " declares ", len, " bytes, ",
           b.size() - pos - 12, " left");
    const std::uint8_t* data = type + 4;
    const std::uint32_t stored = get_be32(data + len);
    const std::uint32_t crc = crc32_of(0, type, 4 + std::size_t{len});
    if (stored != crc) fail(what, ": corrupt PNG: CRC-32 mismatch in chunk '", tname, "' at byte ", pos);
    if (chunk_no == 0 && tname != "IHDR") fail(what, ": corrupt PNG: the first chunk is '", tname, "', not IHDR");
    if (tname == "IHDR") {
      if (chunk_no != 0) fail(what, ": corrupt PNG: a second IHDR chunk");
      if (len != 13) fail(what, ": corrupt PNG: IHDR has ", len, " bytes, expected 13");
      width = get_be32(data);
      height = get_be32(data + 4);
      depth = data[8];
      color = data[9];
      interlace = data[12];
      if (width == 0 || height == 0 || width > png_max_dim || height > png_max_dim)
        fail(what, ": corrupt PNG: invalid size ", width, " x ", height);
      const bool ok_depth = (color == 0 && (depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16)) ||
                            (color == 3 && (depth == 1 || depth == 2 || depth == 4 || depth == 8)) ||
                            ((color == 2 || color == 4 || color == 6) && (depth == 8 || depth == 16));
      if (!ok_depth) fail(what, ": corrupt PNG: invalid colour type ", color, " with bit depth ", depth);
      if (data[10] != 0 || data[11] != 0 || interlace > 1)
        fail(what, ": corrupt PNG: unknown compression, filter or interlace method in IHDR");
      expected = png_data_size(width, height, color, depth, interlace);
    } else if (tname == "PLTE") {
      if (seen_plte || n_idat) fail(what, ": corrupt PNG: misplaced PLTE chunk");
      if (len == 0 || len % 3 != 0 || len > 768) fail(what, ": corrupt PNG: PLTE has ", len, " bytes");
      seen_plte = true;
      info.plte_at = pos;
      info.plte_len = len;
    } else if (tname == "IDAT") {
      if (idat_done) fail(what, ": corrupt PNG: IDAT chunks are not consecutive");
      if (color == 3 && !seen_plte) fail(what, ": corrupt PNG: palette image without PLTE before IDAT");
      ++n_idat;
      if (z_done && len) fail(what, ": corrupt PNG: data after the end of the compressed image stream");
      const std::uint8_t* in = data;
      std::size_t left = len;
      while (left > 0 && !z_done) {
        zs.next_in = const_cast<Bytef*>(in);
        zs.avail_in = static_cast<uInt>(left);
        zs.next_out = sink.data();
        zs.avail_out = static_cast<uInt>(sink.size());
        const int r = inflate(&zs, Z_NO_FLUSH);
        inflated += sink.size() - zs.avail_out;
        const std::size_t used = left - zs.avail_in;
        in += used;
        left -= used;
        if (r == Z_STREAM_END) {
          z_done = true;
          if (left) fail(what, ": corrupt PNG: data after the end of the compressed image stream");
        } else if (r != Z_OK && r != Z_BUF_ERROR) {
          fail(what, ": corrupt PNG: bad compressed image data (zlib: ", zs.msg ? zs.msg : "error", ")");
        }
        if (inflated > expected)  // stop early: no inflating a bomb to the end
          fail(what, ": corrupt PNG: the image data inflates to more than the ", expected, " bytes a ", width, " x ",
               height, " image needs");
      }
    } else if (tname == "IEND") {
      if (len != 0) fail(what, ": corrupt PNG: IEND has ", len, " bytes of data");
      seen_iend = true;
    } else if (!(type[0] & 0x20)) {
      fail(what, ": unsupported PNG: unknown critical chunk '", tname, "'");
    }
    if (n_idat && tname != "IDAT") idat_done = true;
    pos += 12 + std::size_t{len};
    ++chunk_no;
  }
  if (pos != b.size()) fail(what, ": corrupt PNG: ", b.size() - pos, " bytes after the IEND chunk");
  if (!n_idat) fail(what, ": corrupt PNG: no IDAT chunk");
  if (!z_done) fail(what, ": corrupt PNG: the compressed image stream is incomplete");
  if (inflated != expected)
    fail(what, ": corrupt PNG: the image data inflates to ", inflated, " bytes, a ", width, " x ", height,
         " image needs ", expected);
  info.width = width;
  info.height = height;
  info.depth = depth;
  info.color = color;
  info.interlace = interlace;
  return info;
}

/// A copy of a palette PNG whose PLTE is padded with black to 256 entries: stb_image leaves
/// the entries past the palette uninitialised, so indices past its end would read stack garbage.
inline std::vector<std::uint8_t> png_pad_palette(std::span<const std::uint8_t> b, const png_info& info) {
  std::vector<std::uint8_t> out(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(info.plte_at));
  const std::size_t data_at = info.plte_at + 8;
  put_be32(out, 768);
  out.insert(out.end(), b.begin() + static_cast<std::ptrdiff_t>(info.plte_at + 4),
             b.begin() + static_cast<std::ptrdiff_t>(data_at + info.plte_len));
  out.insert(out.end(), 768 - info.plte_len, 0);
  put_be32(out, crc32_of(0, out.data() + info.plte_at + 4, 4 + 768));
  out.insert(out.end(), b.begin() + static_cast<std::ptrdiff_t>(data_at + info.plte_len + 4), b.end());
  return out;
}

}  // namespace detail

/// The PNG file of an 8-bit image of H x W pixels with C channels (1 gray, 2 gray + alpha,
/// 3 RGB, 4 RGBA), pixels[(y * W + x) * C + c]; level is zlib's compression level (0..9).
inline std::vector<std::uint8_t> encode_png(std::span<const std::uint8_t> pixels, index_t H, index_t W, index_t C,
                                            int level = 6) {
  PROMOE_CHECK(C >= 1 && C <= 4, "encode_png: ", C, " channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)");
  PROMOE_CHECK(H >= 1 && W >= 1 && H <= index_t{detail::png_max_dim} && W <= index_t{detail::png_max_dim},
               "encode_png: size ", H, " x ", W, " is outside [1, 2^31 - 1]");
  PROMOE_CHECK(level >= 0 && level <= 9, "encode_png: compression level ", level, " is outside [0, 9]");
  const auto row = static_cast<std::uint64_t>(W) * static_cast<std::uint64_t>(C);
  PROMOE_CHECK(row <= std::numeric_limits<std::size_t>::max() / static_cast<std::uint64_t>(H) / 2,
               "encode_png: a ", H, " x ", W, " x ", C, " image is too large");
  PROMOE_CHECK(pixels.size() == row * static_cast<std::uint64_t>(H), "encode_png: ", pixels.size(),
               " bytes of pixels for a ", H, " x ", W, " x ", C, " image (", row * static_cast<std::uint64_t>(H),
               " bytes)");
  const std::vector<std::uint8_t> raw = detail::png_filter(pixels.data(), static_cast<std::size_t>(H),
                                                           static_cast<std::size_t>(row), static_cast<std::size_t>(C));
  PROMOE_CHECK(raw.size() <= std::numeric_limits<uLong>::max() / 2, "encode_png: image too large for zlib");
  uLongf zlen = compressBound(static_cast<uLong>(raw.size()));
  std::vector<std::uint8_t> z(zlen);
  const int r = compress2(z.data(), &zlen, raw.data(), static_cast<uLong>(raw.size()), level);
  PROMOE_CHECK(r == Z_OK, "encode_png: zlib compress2 failed (", r, ")");
  z.resize(zlen);

  std::vector<std::uint8_t> out(detail::png_signature, detail::png_signature + 8);
  out.reserve(8 + 25 + z.size() + 12 * (1 + z.size() / (std::size_t{1} << 30)) + 12);
  static constexpr std::uint8_t color_type[5] = {0, 0, 4, 2, 6};
  std::vector<std::uint8_t> ihdr;
  detail::put_be32(ihdr, static_cast<std::uint32_t>(W));
  detail::put_be32(ihdr, static_cast<std::uint32_t>(H));
  ihdr.insert(ihdr.end(), {8, color_type[C], 0, 0, 0});  // depth 8, colour type, deflate, filter 0, no interlace
  detail::put_png_chunk(out, "IHDR", ihdr.data(), ihdr.size());
  std::size_t at = 0;
  do {  // IDAT chunks of at most 1 GiB (a chunk's length must stay below 2^31)
    const std::size_t n = std::min(z.size() - at, std::size_t{1} << 30);
    detail::put_png_chunk(out, "IDAT", z.data() + at, n);
    at += n;
  } while (at < z.size());
  detail::put_png_chunk(out, "IEND", nullptr, 0);
  return out;
}

inline std::vector<std::uint8_t> encode_png(const image& img, int level = 6) {
  return encode_png(img.pixels, img.H, img.W, img.C, level);
}

/// Writes a PNG atomically (temporary file in the same directory, fsync, rename).
inline void write_png(const std::string& path, std::span<const std::uint8_t> pixels, index_t H, index_t W, index_t C,
                      int level = 6) {
  const std::vector<std::uint8_t> png = encode_png(pixels, H, W, C, level);
  write_file_atomically(path, "write_png", std::as_bytes(std::span<const std::uint8_t>(png)));
}

inline void write_png(const std::string& path, const image& img, int level = 6) {
  write_png(path, img.pixels, img.H, img.W, img.C, level);
}

/// Decodes a PNG held in memory after check_png validated it; what names the source in
/// messages. channels 0 keeps the file's channel count (palette images give 3 or 4); 1..4
/// converts (stb_image: gray = (77 R + 150 G + 29 B) >> 8, alpha dropped or set to 255).
/// 16-bit samples are reduced to 8 bits; palette indices past the palette's end give black.
inline image decode_png(std::span<const std::uint8_t> bytes, const std::string& what, int channels = 0) {
  PROMOE_CHECK(channels >= 0 && channels <= 4, "decode_png: channels is ", channels, "; expected 0 (as stored) or 1..4");
  const detail::png_info info = detail::check_png(bytes, what);
  std::vector<std::uint8_t> padded;
  if (info.color == 3 && info.plte_len < 768) {
    padded = detail::png_pad_palette(bytes, info);
    bytes = padded;
  }
  PROMOE_CHECK(bytes.size() <= static_cast<std::size_t>(INT_MAX), what, ": PNG file too large for stb_image");
  int w = 0, h = 0, stored = 0;
  struct free_on_exit {
    void operator()(stbi_uc* p) const { stbi_image_free(p); }
  };
  std::unique_ptr<stbi_uc, free_on_exit> px(
      stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &stored, channels));
  if (!px) fail(what, ": cannot decode the PNG (stb_image: ", stbi_failure_reason(), ")");
  image out;
  out.H = h;
  out.W = w;
  out.C = channels ? channels : stored;
  const auto n = static_cast<std::size_t>(out.H * out.W * out.C);
  out.pixels.assign(px.get(), px.get() + n);
  return out;
}

/// Reads and decodes a PNG file (see decode_png); errors name the path.
inline image read_png(const std::string& path, int channels = 0) {
  const std::vector<std::byte> bytes = read_file_bytes(path);
  return decode_png(std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()),
                    path, channels);
}

/// Tiles N images [N, H, W, C] into one image, as torchvision.utils.make_grid(nrow=cols,
/// padding=border, pad_value=pad): min(cols, N) columns, ceil(N / columns) rows, every cell
/// H x W with border pixels of pad between cells and around the grid; cells after the last
/// image are left pad. The grid is (rows * (H + border) + border) x
/// (columns * (W + border) + border) with C channels; image k sits in row k / columns, column
/// k % columns (so N = K * cols images sorted by class give one row per class).
inline image image_grid(std::span<const std::uint8_t> images, index_t N, index_t H, index_t W, index_t C, index_t cols,
                        index_t border = 2, std::uint8_t pad = 0) {
  PROMOE_CHECK(N >= 1 && H >= 1 && W >= 1 && C >= 1, "image_grid: N, H, W and C must be positive, got [", N, ", ", H,
               ", ", W, ", ", C, "]");
  PROMOE_CHECK(cols >= 1, "image_grid: cols is ", cols, ", expected at least 1");
  PROMOE_CHECK(border >= 0, "image_grid: border is ", border, ", expected at least 0");
  PROMOE_CHECK(H <= (index_t{1} << 24) && W <= (index_t{1} << 24) && C <= 4 && N <= (index_t{1} << 31) &&
                   border <= (index_t{1} << 16),
               "image_grid: sizes out of range");
  PROMOE_CHECK(static_cast<std::uint64_t>(images.size()) ==
                   static_cast<std::uint64_t>(N) * static_cast<std::uint64_t>(H * W * C),
               "image_grid: ", images.size(), " bytes for ", N, " images of ", H, " x ", W, " x ", C, " (",
               N * H * W * C, " bytes)");
  const index_t xs = std::min(cols, N);
  const index_t ys = (N + xs - 1) / xs;
  image g;
  g.C = C;
  g.H = ys * (H + border) + border;
  g.W = xs * (W + border) + border;
  PROMOE_CHECK(g.H <= index_t{detail::png_max_dim} && g.W <= index_t{detail::png_max_dim},
               "image_grid: the grid of ", g.H, " x ", g.W, " pixels is too large");
  g.pixels.assign(static_cast<std::size_t>(g.H * g.W * C), pad);
  const auto row = static_cast<std::size_t>(W * C);
  for (index_t k = 0; k < N; ++k) {
    const index_t y0 = (k / xs) * (H + border) + border;
    const index_t x0 = (k % xs) * (W + border) + border;
    for (index_t y = 0; y < H; ++y) {
      const std::uint8_t* src = images.data() + static_cast<std::size_t>((k * H + y) * W * C);
      std::copy(src, src + row, g.pixels.begin() + static_cast<std::ptrdiff_t>(((y0 + y) * g.W + x0) * C));
    }
  }
  return g;
}

}  // namespace promoe::io
