// SPDX-License-Identifier: Apache-2.0
/// \file test_io_data.cpp
/// \brief promoe::io data files: IDX (plain and gzip; every corruption an error naming the
/// file), Fashion-MNIST when installed, the PNG encoder (decoded back by stb_image, chunk
/// structure and CRCs checked independently) and the validating PNG reader, image_grid, .npz
/// archives (read back, and by NumPy when it is available), image-folder datasets and latent
/// sets from safetensors.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define PROMOE_TEST_POSIX 1
#else
#define PROMOE_TEST_POSIX 0
#endif

#include <zlib.h>

#include <catch2/catch.hpp>

#include <promoe/io/atomic_file.hpp>
#include <promoe/io/idx.hpp>
#include <promoe/io/image_folder.hpp>
#include <promoe/io/latents.hpp>
#include <promoe/io/npz.hpp>
#include <promoe/io/png.hpp>

#include "temp_dir.hpp"

using Catch::Contains;
namespace fs = std::filesystem;
namespace io = promoe::io;
using bytes_t = std::vector<std::uint8_t>;

namespace {

using promoe_test::temp_dir;

void write_bytes(const std::string& path, const bytes_t& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(out.good());
}

bytes_t read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes_t(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// gzip through zlib's gzopen/gzwrite, as gzip(1) would.
void write_gz(const std::string& path, const bytes_t& b) {
  gzFile f = gzopen(path.c_str(), "wb9");
  REQUIRE(f != nullptr);
  if (!b.empty()) REQUIRE(gzwrite(f, b.data(), static_cast<unsigned>(b.size())) == static_cast<int>(b.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

bytes_t gz_bytes(const bytes_t& b, const temp_dir& dir) {
  const std::string p = dir.file("scratch.gz");
  write_gz(p, b);
  bytes_t out = read_bytes(p);
  fs::remove(p);
  return out;
}

void be32(bytes_t& out, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(v >> s));
}

/// An IDX file of unsigned bytes.
bytes_t idx_file(const std::vector<std::uint32_t>& dims, const bytes_t& data, std::uint8_t type = 0x08) {
  bytes_t out = {0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (const auto d : dims) be32(out, d);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

bytes_t random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(0, 255);
  bytes_t out(n);
  for (auto& b : out) b = static_cast<std::uint8_t>(dist(gen));
  return out;
}

std::span<const std::byte> as_bytes(const bytes_t& b) { return std::as_bytes(std::span<const std::uint8_t>(b)); }

std::uint32_t get_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}

/// Runs a shell command and returns its standard output; ok is false when it fails.
std::string run_command(const std::string& cmd, bool& ok) {
  ok = false;
  std::string out;
#if PROMOE_TEST_POSIX
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  ok = ::pclose(p) == 0;
#else
  (void)cmd;
#endif
  return out;
}

bool python_numpy_available() {
  static const bool available = [] {
    if (!fs::exists("/usr/bin/python3")) return false;
    bool ok = false;
    run_command("/usr/bin/python3 -c \"import numpy\" >/dev/null 2>&1", ok);
    return ok;
  }();
  return available;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------------

TEST_CASE("idx: plain and gzip round trips", "[io][idx]") {
  temp_dir dir("idx_rt");
  const bytes_t pixels = random_bytes(3 * 5 * 4, 1);
  const bytes_t labels = {7, 0, 9};
  const bytes_t images_file = idx_file({3, 5, 4}, pixels);
  const bytes_t labels_file = idx_file({3}, labels);

  const auto check = [&](const std::string& ip, const std::string& lp) {
    const io::idx_array a = io::read_idx(ip);
    CHECK(a.dims == std::vector<promoe::index_t>{3, 5, 4});
    CHECK(a.bytes == pixels);
    CHECK(a.numel() == 60);
    const io::labelled_images d = io::load_idx_dataset(ip, lp);
    CHECK(d.N == 3);
    CHECK(d.H == 5);
    CHECK(d.W == 4);
    CHECK(d.C == 1);
    CHECK(d.pixels == pixels);
    CHECK(d.labels == std::vector<std::int64_t>{7, 0, 9});
    CHECK(d.class_names.empty());
    const auto second = d.image(1);
    CHECK(bytes_t(second.begin(), second.end()) == bytes_t(pixels.begin() + 20, pixels.begin() + 40));
    CHECK_THROWS_WITH(d.image(3), Contains("out of range"));
  };
  SECTION("plain") {
    write_bytes(dir.file("images"), images_file);
    write_bytes(dir.file("labels"), labels_file);
    check(dir.file("images"), dir.file("labels"));
  }
  SECTION("gzip (gzopen/gzwrite)") {
    write_gz(dir.file("images.gz"), images_file);
    write_gz(dir.file("labels.gz"), labels_file);
    CHECK(read_bytes(dir.file("images.gz"))[0] == 0x1f);
    check(dir.file("images.gz"), dir.file("labels.gz"));
  }
  SECTION("gzip with several members, mixed with a plain file") {
    const bytes_t head(images_file.begin(), images_file.begin() + 7);  // splits the header
    const bytes_t tail(images_file.begin() + 7, images_file.end());
    bytes_t two = gz_bytes(head, dir);
    const bytes_t second = gz_bytes(tail, dir);
    two.insert(two.end(), second.begin(), second.end());
    write_bytes(dir.file("images.gz"), two);
    write_bytes(dir.file("labels"), labels_file);
    check(dir.file("images.gz"), dir.file("labels"));
  }
  SECTION("a large file through several 64 KiB input buffers") {
    const bytes_t big = random_bytes(300 * 28 * 28, 2);  // random: barely compressible
    write_gz(dir.file("big.gz"), idx_file({300, 28, 28}, big));
    REQUIRE(fs::file_size(dir.file("big.gz")) > 3 * 65536);
    CHECK(io::read_idx(dir.file("big.gz")).bytes == big);
  }
  SECTION("zero-sized dimensions and other ranks read as arrays") {
    write_bytes(dir.file("empty"), idx_file({0, 28, 28}, {}));
    CHECK(io::read_idx(dir.file("empty")).bytes.empty());
    write_bytes(dir.file("rank4"), idx_file({1, 2, 1, 2}, {1, 2, 3, 4}));
    CHECK(io::read_idx(dir.file("rank4")).dims.size() == 4);
    CHECK_THROWS_WITH(io::load_idx_dataset(dir.file("empty"), dir.file("rank4")), Contains("no pixels"));
  }
}

TEST_CASE("idx: every corruption is an error naming the file and the problem", "[io][idx]") {
  temp_dir dir("idx_bad");
  const bytes_t pixels = random_bytes(2 * 3 * 3, 3);
  const bytes_t good = idx_file({2, 3, 3}, pixels);
  const bytes_t good_labels = idx_file({2}, {1, 2});
  const std::string p = dir.file("f.idx");
  write_bytes(dir.file("labels"), good_labels);
  write_bytes(dir.file("images"), good);

  const auto fails = [&](const bytes_t& content, const std::string& what) {
    write_bytes(p, content);
    CHECK_THROWS_AS(io::read_idx(p), promoe::error);
    CHECK_THROWS_WITH(io::read_idx(p), Contains(p) && Contains(what));
  };
  const auto fails_gz = [&](const bytes_t& content, const std::string& what) {
    write_gz(p, content);
    CHECK_THROWS_WITH(io::read_idx(p), Contains(p) && Contains(what));
  };

  SECTION("missing file, directory") {
    CHECK_THROWS_WITH(io::read_idx(dir.file("nope")), Contains(dir.file("nope")) && Contains("no such file"));
    CHECK_THROWS_WITH(io::read_idx(dir.path.string()), Contains("is a directory"));
    CHECK_THROWS_WITH(io::load_idx_dataset(dir.file("images"), dir.file("nope")), Contains(dir.file("nope")));
  }
  SECTION("truncated header") {
    fails({}, "truncated IDX header");
    fails({0, 0, 8}, "truncated IDX header");
    fails(bytes_t(good.begin(), good.begin() + 10), "truncated IDX header");  // 3 dims need 12 bytes
    fails_gz(bytes_t(good.begin(), good.begin() + 10), "truncated IDX header");
  }
  SECTION("truncated data") {
    fails(bytes_t(good.begin(), good.end() - 1), "truncated IDX data");
    fails_gz(bytes_t(good.begin(), good.end() - 1), "truncated IDX data");
    fails(idx_file({2}, {}), "truncated IDX data");
  }
  SECTION("bad magic, unknown or unsupported type, no dimensions") {
    bytes_t b = good;
    b[0] = 1;
    fails(b, "not an IDX file");
    b = good;
    b[1] = 0x08;
    fails(b, "not an IDX file");
    fails(idx_file({2, 3, 3}, pixels, 0x07), "unknown type code 0x07");
    fails(idx_file({2}, bytes_t(8), 0x0D), "float32");
    fails(idx_file({}, {}), "0 dimensions");
  }
  SECTION("trailing bytes") {
    bytes_t b = good;
    b.push_back(0);
    fails(b, "trailing data: 1 bytes");
    fails_gz(b, "trailing data");
    b.insert(b.end(), 5000, 1);
    fails(b, "trailing data: 5001 bytes");
  }
  SECTION("dimensions too large for the file, and overflowing ones") {
    fails(idx_file({0xffffffffu, 0xffffffffu, 0xffffffffu}, pixels), "too large");
    fails(idx_file({60000, 28, 28}, pixels), "truncated IDX data");
    fails_gz(idx_file({60000, 28, 28}, pixels), "more than a gzip file");
  }
  SECTION("images and labels disagree") {
    write_bytes(dir.file("labels3"), idx_file({3}, {1, 2, 3}));
    CHECK_THROWS_WITH(io::load_idx_dataset(dir.file("images"), dir.file("labels3")),
                      Contains(dir.file("labels3")) && Contains("holds 3 labels") && Contains("2 images"));
    // ranks: labels as images, images as labels
    CHECK_THROWS_WITH(io::load_idx_dataset(dir.file("labels"), dir.file("labels")),
                      Contains(dir.file("labels")) && Contains("3 dimensions"));
    CHECK_THROWS_WITH(io::load_idx_dataset(dir.file("images"), dir.file("images")),
                      Contains(dir.file("images")) && Contains("1 dimension"));
  }
  SECTION("corrupt gzip") {
    const bytes_t gz = gz_bytes(good, dir);
    bytes_t b = gz;
    b[b.size() - 8] ^= 0x01;  // the CRC-32 of the trailer
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains(p) && Contains("corrupt gzip") && Contains("incorrect data check"));
    b = gz;
    b[b.size() - 4] ^= 0x01;  // ISIZE
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("corrupt gzip") && Contains("incorrect length check"));
    b = gz;
    b[2] = 7;  // compression method
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("corrupt gzip"));
    b = bytes_t(gz.begin(), gz.end() - 5);  // truncated inside the trailer
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("corrupt gzip") && Contains("ends early"));
    b = bytes_t(gz.begin(), gz.begin() + 12);
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("corrupt gzip"));
    b = gz;
    b.insert(b.end(), {'j', 'u', 'n', 'k'});
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("after the end of the gzip stream"));
    b = gz;
    b.push_back(0x1f);
    write_bytes(p, b);
    CHECK_THROWS_WITH(io::read_idx(p), Contains("after the end of the gzip stream"));
  }
  SECTION("every truncation and every single-byte change: a promoe::error or a valid array, never a crash") {
    const bytes_t gz = gz_bytes(good, dir);
    for (const bytes_t* base : {&good, &gz}) {
      for (std::size_t n = 0; n < base->size(); ++n) {
        write_bytes(p, bytes_t(base->begin(), base->begin() + static_cast<std::ptrdiff_t>(n)));
        CHECK_THROWS_AS(io::read_idx(p), promoe::error);
      }
      for (std::size_t i = 0; i < base->size(); ++i) {
        for (const std::uint8_t x : {0x01, 0x80, 0xff}) {
          bytes_t b = *base;
          b[i] ^= x;
          write_bytes(p, b);
          try {
            const auto a = io::read_idx(p);
            CHECK(a.bytes.size() == static_cast<std::size_t>(std::accumulate(
                                        a.dims.begin(), a.dims.end(), promoe::index_t{1}, std::multiplies<>())));
          } catch (const promoe::error& e) {
            CHECK_THAT(e.what(), Contains(p));
          }
        }
      }
    }
  }
}

TEST_CASE("idx: Fashion-MNIST as installed by dataset-fashion-mnist", "[io][idx][fashion]") {
  const std::string dir = io::fashion_mnist_default_dir();
  CHECK(dir == "/usr/share/datasets/fashion-mnist");
  const auto& names = io::fashion_mnist_classes();
  CHECK(names[0] == "T-shirt/top");
  CHECK(names[9] == "Ankle boot");
  const std::vector<std::string_view> all(names.begin(), names.end());
  CHECK(all == std::vector<std::string_view>{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                             "Sneaker", "Bag", "Ankle boot"});
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz") || !fs::exists(dir + "/t10k-labels-idx1-ubyte.gz")) {
    WARN("Fashion-MNIST not installed under " << dir << " (apt-get install dataset-fashion-mnist); skipped");
    return;
  }
  for (const bool train : {true, false}) {
    const io::labelled_images d = io::load_fashion_mnist(train);
    const promoe::index_t n = train ? 60000 : 10000;
    CHECK(d.N == n);
    CHECK(d.H == 28);
    CHECK(d.W == 28);
    CHECK(d.C == 1);
    CHECK(d.pixels.size() == static_cast<std::size_t>(n * 28 * 28));
    REQUIRE(d.labels.size() == static_cast<std::size_t>(n));
    CHECK(d.class_names.size() == 10);
    std::array<std::int64_t, 10> count{};
    for (const auto l : d.labels) {
      REQUIRE(l >= 0);
      REQUIRE(l < 10);
      ++count[static_cast<std::size_t>(l)];
    }
    for (const auto c : count) CHECK(c == n / 10);  // balanced classes
    const auto first = d.image(0);
    CHECK(*std::max_element(first.begin(), first.end()) > 0);
    if (train) {
      CHECK(d.labels[0] == 9);
      CHECK(d.class_names[static_cast<std::size_t>(d.labels[0])] == "Ankle boot");
    }
  }
  // The same through load_idx_dataset, and a grid with one row per class.
  const auto d = io::load_idx_dataset(dir + "/t10k-images-idx3-ubyte.gz", dir + "/t10k-labels-idx1-ubyte.gz");
  CHECK(d.N == 10000);
  const int per_class = 6;
  bytes_t sel;
  for (std::int64_t k = 0; k < 10; ++k) {
    int taken = 0;
    for (promoe::index_t i = 0; i < d.N && taken < per_class; ++i)
      if (d.labels[static_cast<std::size_t>(i)] == k) {
        const auto img = d.image(i);
        sel.insert(sel.end(), img.begin(), img.end());
        ++taken;
      }
    REQUIRE(taken == per_class);
  }
  const io::image grid = io::image_grid(sel, 10 * per_class, 28, 28, 1, per_class);
  CHECK(grid.H == 10 * 30 + 2);
  CHECK(grid.W == per_class * 30 + 2);
  const auto back = io::decode_png(io::encode_png(grid), "grid");
  CHECK(back.pixels == grid.pixels);
}

// ---------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------

namespace {

/// An image whose rows mix smooth gradients and noise, so that every PNG filter gets chosen.
bytes_t test_image(promoe::index_t H, promoe::index_t W, promoe::index_t C, std::uint32_t seed) {
  const bytes_t noise = random_bytes(static_cast<std::size_t>(H * W * C), seed);
  bytes_t out(noise.size());
  for (promoe::index_t y = 0; y < H; ++y)
    for (promoe::index_t x = 0; x < W; ++x)
      for (promoe::index_t c = 0; c < C; ++c) {
        const auto i = static_cast<std::size_t>((y * W + x) * C + c);
        switch (y % 3) {
          case 0: out[i] = static_cast<std::uint8_t>(x * 17 + c * 50); break;
          case 1: out[i] = static_cast<std::uint8_t>(y * 9 + x * 3 + c); break;
          default: out[i] = noise[i]; break;
        }
      }
  return out;
}

struct chunk {
  std::string type;
  std::size_t at, length;
};

/// Walks a PNG's chunks, checking each CRC-32 with zlib independently of png.hpp.
std::vector<chunk> png_chunks(const bytes_t& png) {
  static const std::uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  REQUIRE(png.size() >= 8);
  REQUIRE(std::equal(sig, sig + 8, png.begin()));
  std::vector<chunk> out;
  std::size_t pos = 8;
  while (pos < png.size()) {
    REQUIRE(png.size() - pos >= 12);
    const std::size_t len = get_be32(&png[pos]);
    REQUIRE(png.size() - pos - 12 >= len);
    const uLong crc = crc32(0, &png[pos + 4], static_cast<uInt>(4 + len));
    CHECK(get_be32(&png[pos + 8 + len]) == crc);
    out.push_back({std::string(reinterpret_cast<const char*>(&png[pos + 4]), 4), pos, len});
    pos += 12 + len;
  }
  CHECK(pos == png.size());
  return out;
}

/// Recomputes the CRC of the chunk at 'at' (after a test changed its data).
void fix_crc(bytes_t& png, const chunk& c) {
  const uLong crc = crc32(0, &png[c.at + 4], static_cast<uInt>(4 + c.length));
  for (int k = 0; k < 4; ++k) png[c.at + 8 + c.length + static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(crc >> (24 - 8 * k));
}

}  // namespace

TEST_CASE("png: encode, then decode with stb_image: exact pixels, valid structure", "[io][png]") {
  const std::array<std::pair<int, int>, 6> sizes = {{{1, 1}, {1, 7}, {5, 1}, {3, 5}, {13, 7}, {31, 33}}};
  for (const int C : {1, 2, 3, 4}) {
    for (const auto& [H, W] : sizes) {
      CAPTURE(C, H, W);
      const bytes_t px = test_image(H, W, C, static_cast<std::uint32_t>(H * 100 + W + C));
      for (const int level : {0, 6, 9}) {
        const bytes_t png = io::encode_png(px, H, W, C, level);
        // structure: IHDR first with the right fields, IDAT, IEND last; every CRC right
        const auto chunks = png_chunks(png);
        REQUIRE(chunks.size() >= 3);
        CHECK(chunks.front().type == "IHDR");
        CHECK(chunks.front().length == 13);
        const std::uint8_t* ihdr = &png[chunks.front().at + 8];
        CHECK(get_be32(ihdr) == static_cast<std::uint32_t>(W));
        CHECK(get_be32(ihdr + 4) == static_cast<std::uint32_t>(H));
        CHECK(int{ihdr[8]} == 8);
        CHECK(int{ihdr[9]} == std::array<int, 5>{0, 0, 4, 2, 6}[static_cast<std::size_t>(C)]);
        CHECK(int{ihdr[12]} == 0);
        CHECK(chunks[1].type == "IDAT");
        CHECK(chunks.back().type == "IEND");
        CHECK(chunks.back().length == 0);
        // stb_image directly, as stored
        int w = 0, h = 0, comp = 0;
        stbi_uc* raw = stbi_load_from_memory(png.data(), static_cast<int>(png.size()), &w, &h, &comp, 0);
        REQUIRE(raw != nullptr);
        CHECK(w == W);
        CHECK(h == H);
        CHECK(comp == C);
        CHECK(bytes_t(raw, raw + H * W * C) == px);
        stbi_image_free(raw);
        // and through the validating decoder
        const io::image back = io::decode_png(png, "mem.png");
        CHECK(back.H == H);
        CHECK(back.W == W);
        CHECK(back.C == C);
        CHECK(back.pixels == px);
      }
    }
  }
}

TEST_CASE("png: files, channel conversion and the image struct", "[io][png]") {
  temp_dir dir("png_file");
  const bytes_t rgb = test_image(9, 11, 3, 5);
  const std::string path = dir.file("rgb.png");
  io::write_png(path, rgb, 9, 11, 3);
  CHECK(dir.entries() == std::vector<std::string>{"rgb.png"});
  const io::image back = io::read_png(path);
  CHECK(back.pixels == rgb);
  const io::image gray = io::read_png(path, 1);
  REQUIRE(gray.C == 1);
  REQUIRE(gray.pixels.size() == 99);
  for (std::size_t i = 0; i < 99; ++i)
    CHECK(int{gray.pixels[i]} == (77 * rgb[3 * i] + 150 * rgb[3 * i + 1] + 29 * rgb[3 * i + 2]) >> 8);
  const io::image rgba = io::read_png(path, 4);
  for (std::size_t i = 0; i < 99; ++i) CHECK(int{rgba.pixels[4 * i + 3]} == 255);

  const io::image g{4, 3, 1, bytes_t{0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 255}};
  io::write_png(dir.file("g.png"), g);
  const io::image g3 = io::read_png(dir.file("g.png"), 3);
  CHECK(g3.C == 3);
  for (std::size_t i = 0; i < 12; ++i)
    for (std::size_t c = 0; c < 3; ++c) CHECK(g3.pixels[3 * i + c] == g.pixels[i]);
  // overwrite atomically; a missing folder is an error that leaves nothing behind
  io::write_png(dir.file("g.png"), rgb, 9, 11, 3);
  CHECK(io::read_png(dir.file("g.png")).pixels == rgb);
  const std::string nowhere = dir.file("no/such/dir/x.png");
  CHECK_THROWS_WITH(io::write_png(nowhere, g), Contains(nowhere) && Contains("cannot create the temporary file"));
  CHECK(dir.entries() == std::vector<std::string>{"g.png", "rgb.png"});
}

TEST_CASE("png: encoder argument errors", "[io][png]") {
  const bytes_t px(12);
  CHECK_THROWS_WITH(io::encode_png(px, 2, 2, 5), Contains("5 channels"));
  CHECK_THROWS_WITH(io::encode_png(px, 2, 2, 0), Contains("0 channels"));
  CHECK_THROWS_WITH(io::encode_png(px, 0, 4, 3), Contains("outside [1, 2^31 - 1]"));
  CHECK_THROWS_WITH(io::encode_png(px, 2, 2, 1), Contains("12 bytes of pixels for a 2 x 2 x 1 image"));
  CHECK_THROWS_WITH(io::encode_png(px, 2, 2, 3, 10), Contains("compression level 10"));
  CHECK_THROWS_WITH(io::decode_png(io::encode_png(px, 2, 2, 3), "x", 5), Contains("channels is 5"));
}

TEST_CASE("png: the reader rejects corrupt files with the file named", "[io][png]") {
  temp_dir dir("png_bad");
  const bytes_t good = io::encode_png(test_image(6, 7, 3, 9), 6, 7, 3);
  const auto chunks = png_chunks(good);
  const chunk& idat = chunks[1];
  REQUIRE(idat.type == "IDAT");
  const std::string p = dir.file("bad.png");
  const auto fails = [&](const bytes_t& b, const std::string& what) {
    write_bytes(p, b);
    CHECK_THROWS_AS(io::read_png(p), promoe::error);
    CHECK_THROWS_WITH(io::read_png(p), Contains(p) && Contains(what));
  };
  CHECK_THROWS_WITH(io::read_png(dir.file("none.png")), Contains("none.png") && Contains("no such file"));
  fails({}, "not a PNG file");
  fails({'G', 'I', 'F', '8', '9', 'a', 0, 0, 0, 0}, "not a PNG file");
  fails(bytes_t(good.begin(), good.begin() + 20), "truncated PNG");
  fails(bytes_t(good.begin(), good.end() - 12), "missing IEND");  // no IEND
  bytes_t b = good;
  b.push_back(0);
  fails(b, "bytes after the IEND chunk");
  b = good;
  b[idat.at + 8 + idat.length / 2] ^= 0x10;
  fails(b, "CRC-32 mismatch in chunk 'IDAT'");
  fix_crc(b, idat);  // CRC right, compressed data wrong: zlib (Adler-32 or structure) catches it
  fails(b, "corrupt PNG");
  b = good;
  b[16 + 3] = 0;  // IHDR width 0 (CRC fixed so the field check itself is reached)
  b[16 + 2] = 0;
  b[16 + 1] = 0;
  b[16 + 0] = 0;
  fix_crc(b, chunks[0]);
  fails(b, "invalid size");
  b = good;
  b[8 + 8 + 9] = 5;  // colour type 5 does not exist
  fix_crc(b, chunks[0]);
  fails(b, "invalid colour type");
  b = good;
  b[8 + 8 + 4 + 3] = 7;  // height 7 instead of 6: the data inflates to one row too few
  fix_crc(b, chunks[0]);
  fails(b, "inflates to");
  b = good;
  b[12] = 'X';  // first chunk's type
  fails(b, "CRC-32 mismatch");
  // every truncation, every single-byte change: an error or a decoded image, never a crash
  for (std::size_t n = 0; n < good.size(); ++n)
    CHECK_THROWS_AS(io::decode_png(std::span<const std::uint8_t>(good.data(), n), "cut.png"), promoe::error);
  int decoded = 0;
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (const std::uint8_t x : {0x01, 0x80}) {
      bytes_t m = good;
      m[i] ^= x;
      try {
        const auto img = io::decode_png(m, "mutant.png");
        CHECK(img.pixels.size() == static_cast<std::size_t>(img.H * img.W * img.C));
        ++decoded;
      } catch (const promoe::error& e) {
        CHECK_THAT(e.what(), Contains("mutant.png"));
      }
    }
  }
  CHECK(decoded == 0);  // every byte of a minimal PNG is covered by a CRC or the signature
}

namespace {

/// A PNG from IHDR fields and the uncompressed (filtered) scanline data, CRCs right.
bytes_t make_png(std::uint32_t w, std::uint32_t h, int depth, int color, int interlace, const bytes_t& raw,
                 const bytes_t& plte = {}) {
  bytes_t out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  const auto put = [&](const char* type, const bytes_t& data) {
    be32(out, static_cast<std::uint32_t>(data.size()));
    const std::size_t start = out.size();
    out.insert(out.end(), type, type + 4);
    out.insert(out.end(), data.begin(), data.end());
    be32(out, static_cast<std::uint32_t>(crc32(0, &out[start], static_cast<uInt>(out.size() - start))));
  };
  bytes_t ihdr;
  be32(ihdr, w);
  be32(ihdr, h);
  ihdr.insert(ihdr.end(), {static_cast<std::uint8_t>(depth), static_cast<std::uint8_t>(color), 0, 0,
                           static_cast<std::uint8_t>(interlace)});
  put("IHDR", ihdr);
  if (!plte.empty()) put("PLTE", plte);
  uLongf zlen = compressBound(static_cast<uLong>(raw.size()));
  bytes_t z(zlen);
  REQUIRE(compress2(z.data(), &zlen, raw.data(), static_cast<uLong>(raw.size()), 6) == Z_OK);
  z.resize(zlen);
  put("IDAT", z);
  put("IEND", {});
  return out;
}

/// The filtered data size IHDR implies (test-local, independent of png.hpp).
std::size_t raw_size(std::uint32_t w, std::uint32_t h, int depth, int color, bool interlace) {
  const int ch = std::array<int, 7>{1, 0, 3, 1, 2, 0, 4}[static_cast<std::size_t>(color)];
  const auto rows = [&](std::size_t pw, std::size_t ph) { return pw && ph ? ph * (1 + (pw * ch * depth + 7) / 8) : 0; };
  if (!interlace) return rows(w, h);
  const int x0[7] = {0, 4, 0, 2, 0, 1, 0}, y0[7] = {0, 0, 4, 0, 2, 0, 1}, dx[7] = {8, 8, 4, 4, 2, 2, 1},
            dy[7] = {8, 8, 8, 4, 4, 2, 2};
  std::size_t n = 0;
  for (int p = 0; p < 7; ++p) {
    const std::size_t pw = w > static_cast<std::uint32_t>(x0[p]) ? (w - x0[p] + dx[p] - 1) / dx[p] : 0;
    const std::size_t ph = h > static_cast<std::uint32_t>(y0[p]) ? (h - y0[p] + dy[p] - 1) / dy[p] : 0;
    n += rows(pw, ph);
  }
  return n;
}

}  // namespace

TEST_CASE("png: files from other encoders (16-bit, palette, interlaced) and CRC-valid nonsense", "[io][png]") {
  SECTION("16-bit gray: stb_image keeps the high byte") {
    bytes_t raw;
    for (int y = 0; y < 3; ++y) {
      raw.push_back(0);
      for (int x = 0; x < 4; ++x) raw.insert(raw.end(), {static_cast<std::uint8_t>(y * 40 + x), 0x77});
    }
    const io::image img = io::decode_png(make_png(4, 3, 16, 0, 0, raw), "g16.png");
    CHECK(img.C == 1);
    for (int y = 0; y < 3; ++y)
      for (int x = 0; x < 4; ++x) CHECK(int{img.pixels[static_cast<std::size_t>(y * 4 + x)]} == y * 40 + x);
  }
  SECTION("palette: expanded to RGB") {
    const bytes_t plte = {10, 20, 30, 200, 100, 0};
    const bytes_t raw = {0, 0, 1, 1, 0, 0, 1, 0, 1, 0};  // 2 rows of 4 indices, filter None
    const io::image img = io::decode_png(make_png(4, 2, 8, 3, 0, raw, plte), "p.png");
    CHECK(img.C == 3);
    CHECK(img.pixels == bytes_t{10, 20, 30, 200, 100, 0, 200, 100, 0, 10, 20, 30,
                                200, 100, 0, 10, 20, 30, 200, 100, 0, 10, 20, 30});
    CHECK_THROWS_WITH(io::decode_png(make_png(4, 2, 8, 3, 0, raw), "p.png"), Contains("without PLTE"));
    // indices past the palette's end read black (stb_image alone would read uninitialised memory)
    const io::image past = io::decode_png(make_png(4, 2, 8, 3, 0, bytes_t{0, 0, 5, 255, 1, 0, 1, 0, 1, 0}, plte), "p.png");
    CHECK(bytes_t(past.pixels.begin(), past.pixels.begin() + 12) == bytes_t{10, 20, 30, 0, 0, 0, 0, 0, 0, 200, 100, 0});
    // 1-bit indices, and a 4-channel request (alpha 255)
    const io::image bits = io::decode_png(make_png(3, 1, 1, 3, 0, bytes_t{0, 0b10100000}, plte), "p.png", 4);
    CHECK(bits.pixels == bytes_t{200, 100, 0, 255, 10, 20, 30, 255, 200, 100, 0, 255});
  }
  SECTION("random scanlines for every IHDR combination: a decoded image or a promoe::error, never a crash") {
    std::mt19937 gen(77);
    int decoded = 0, rejected = 0;
    const std::array<std::pair<int, int>, 15> kinds = {{{0, 1}, {0, 2}, {0, 4}, {0, 8}, {0, 16}, {2, 8}, {2, 16},
                                                        {3, 1}, {3, 2}, {3, 4}, {3, 8}, {4, 8}, {4, 16}, {6, 8},
                                                        {6, 16}}};
    for (const auto& [color, depth] : kinds)
      for (const int interlace : {0, 1})
        for (const auto& [w, h] : std::array<std::pair<std::uint32_t, std::uint32_t>, 4>{{{1, 1}, {3, 2}, {9, 10}, {17, 5}}})
          for (int trial = 0; trial < 4; ++trial) {
            CAPTURE(color, depth, interlace, w, h, trial);
            bytes_t raw = random_bytes(raw_size(w, h, depth, color, interlace), gen());
            if (trial < 2)  // valid filter bytes in half the trials: these must decode
              for (auto& b : raw) b = static_cast<std::uint8_t>(b % 5);
            bytes_t plte;
            if (color == 3) plte = random_bytes(3 * (1 + gen() % 256), gen());
            const bytes_t png = make_png(w, h, depth, color, interlace, raw, plte);
            for (const int want : {0, 1, 3}) {
              try {
                const io::image img = io::decode_png(png, "r.png", want);
                CHECK(img.W == static_cast<promoe::index_t>(w));
                CHECK(img.H == static_cast<promoe::index_t>(h));
                CHECK(img.pixels.size() == static_cast<std::size_t>(img.H * img.W * img.C));
                ++decoded;
              } catch (const promoe::error& e) {
                CHECK_THAT(e.what(), Contains("r.png"));
                ++rejected;
              }
            }
          }
    CHECK(decoded >= 15 * 2 * 4 * 2 * 3);
    CHECK(rejected > 0);
  }
  SECTION("an IDAT stream shorter or longer than the size IHDR implies") {
    const bytes_t raw(raw_size(5, 4, 8, 2, 0) - 1, 0);
    CHECK_THROWS_WITH(io::decode_png(make_png(5, 4, 8, 2, 0, raw), "s.png"), Contains("inflates to 63 bytes"));
    const bytes_t bomb(50'000'000, 0);  // 50 MB of zeros for a 5 x 4 image: stopped early
    CHECK_THROWS_WITH(io::decode_png(make_png(5, 4, 8, 2, 0, bomb), "s.png"), Contains("inflates to more than the 64"));
  }
  SECTION("ancillary chunks are skipped, unknown critical ones rejected") {
    const bytes_t good = make_png(2, 2, 8, 0, 0, bytes_t{0, 1, 2, 0, 3, 4});
    const auto with_chunk = [&](const char* type) {
      bytes_t b(good.begin(), good.end() - 12);  // up to IEND
      bytes_t c;
      be32(c, 3);
      c.insert(c.end(), type, type + 4);
      c.insert(c.end(), {'a', 'b', 'c'});
      be32(c, static_cast<std::uint32_t>(crc32(0, &c[4], 7)));
      b.insert(b.end(), c.begin(), c.end());
      b.insert(b.end(), good.end() - 12, good.end());
      return b;
    };
    CHECK(io::decode_png(with_chunk("tEXt"), "t.png").pixels == bytes_t{1, 2, 3, 4});
    CHECK_THROWS_WITH(io::decode_png(with_chunk("QQQQ"), "t.png"), Contains("unknown critical chunk 'QQQQ'"));
  }
}

TEST_CASE("png: image_grid lays images out like make_grid", "[io][png][grid]") {
  const promoe::index_t N = 5, H = 2, W = 3, C = 1, cols = 2, border = 2;
  bytes_t imgs(static_cast<std::size_t>(N * H * W * C));
  std::iota(imgs.begin(), imgs.end(), std::uint8_t{100});
  const std::uint8_t pad = 7;
  const io::image g = io::image_grid(imgs, N, H, W, C, cols, border, pad);
  REQUIRE(g.H == 3 * (H + border) + border);
  REQUIRE(g.W == 2 * (W + border) + border);
  REQUIRE(g.C == 1);
  for (promoe::index_t y = 0; y < g.H; ++y)
    for (promoe::index_t x = 0; x < g.W; ++x) {
      CAPTURE(y, x);
      const promoe::index_t cy = (y - border) / (H + border), iy = (y - border) % (H + border);
      const promoe::index_t cx = (x - border) / (W + border), ix = (x - border) % (W + border);
      const bool inside = y >= border && x >= border && iy < H && ix < W;
      const promoe::index_t k = cy * cols + cx;
      const std::uint8_t v = g.pixels[static_cast<std::size_t>(y * g.W + x)];
      if (inside && k < N)
        CHECK(v == imgs[static_cast<std::size_t>((k * H + iy) * W + ix)]);
      else
        CHECK(v == pad);
    }
  SECTION("one row per class: image k of class r in row r, column k") {
    const promoe::index_t K = 3, per = 4;
    bytes_t rgb(static_cast<std::size_t>(K * per * 1 * 1 * 3));
    for (promoe::index_t r = 0; r < K; ++r)
      for (promoe::index_t k = 0; k < per; ++k)
        for (int c = 0; c < 3; ++c) rgb[static_cast<std::size_t>(((r * per + k) * 3) + c)] = static_cast<std::uint8_t>(r * 10 + k);
    const io::image gg = io::image_grid(rgb, K * per, 1, 1, 3, per, 1, 255);
    CHECK(gg.H == K * 2 + 1);
    CHECK(gg.W == per * 2 + 1);
    for (promoe::index_t r = 0; r < K; ++r)
      for (promoe::index_t k = 0; k < per; ++k)
        CHECK(gg.pixels[static_cast<std::size_t>(((1 + 2 * r) * gg.W + 1 + 2 * k) * 3)] == r * 10 + k);
  }
  SECTION("more columns than images, no border") {
    const io::image g2 = io::image_grid(imgs, N, H, W, C, 10, 0);
    CHECK(g2.H == H);
    CHECK(g2.W == N * W);
    for (promoe::index_t k = 0; k < N; ++k)
      for (promoe::index_t y = 0; y < H; ++y)
        for (promoe::index_t x = 0; x < W; ++x)
          CHECK(g2.pixels[static_cast<std::size_t>(y * g2.W + k * W + x)] ==
                imgs[static_cast<std::size_t>((k * H + y) * W + x)]);
  }
  SECTION("errors") {
    CHECK_THROWS_WITH(io::image_grid(imgs, N, H, W, C, 0), Contains("cols is 0"));
    CHECK_THROWS_WITH(io::image_grid(imgs, N + 1, H, W, C, 2), Contains("30 bytes for 6 images"));
    CHECK_THROWS_WITH(io::image_grid(imgs, N, H, W, C, 2, -1), Contains("border is -1"));
    CHECK_THROWS_WITH(io::image_grid(imgs, 0, H, W, C, 2), Contains("must be positive"));
  }
}

// ---------------------------------------------------------------------------------------------
// NPZ
// ---------------------------------------------------------------------------------------------

TEST_CASE("npy: headers as NumPy writes them, parsed back", "[io][npz]") {
  const std::vector<std::int64_t> v = {1, -2, 3, 1LL << 40, -(1LL << 50)};
  const auto b = io::npy_bytes(io::npy_dtype::i64, {5}, v.data());
  REQUIRE(b.size() == 128 + 40);  // 10 + 57 + 1 header bytes round up to 128
  const std::string head(reinterpret_cast<const char*>(b.data()), 128);
  CHECK(head.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK(int(static_cast<unsigned char>(head[8])) + 256 * int(static_cast<unsigned char>(head[9])) == 118);
  const std::string dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }";
  CHECK(head.substr(10) == dict + std::string(128 - 10 - dict.size() - 1, ' ') + "\n");
  const auto a = io::parse_npy(b, "v.npy");
  CHECK(a.type == io::npy_dtype::i64);
  CHECK(a.shape == std::vector<std::int64_t>{5});
  CHECK(a.values<std::int64_t>() == v);
  CHECK_THROWS_WITH(a.values<std::uint8_t>(), Contains("'<i8'"));

  const auto s = io::npy_bytes(io::npy_dtype::f32, {}, std::vector<float>{2.5f}.data());
  CHECK(std::string(reinterpret_cast<const char*>(s.data()) + 10, s.size() - 14).find("'shape': (), }") !=
        std::string::npos);
  CHECK(io::parse_npy(s, "s").values<double>() == std::vector<double>{2.5});
  const auto e = io::npy_bytes(io::npy_dtype::u8, {0, 3}, nullptr);
  CHECK(e.size() == 128);
  CHECK(io::parse_npy(e, "e").shape == std::vector<std::int64_t>{0, 3});
  for (int rank = 0; rank < 8; ++rank) {
    std::vector<std::int64_t> shape(static_cast<std::size_t>(rank), 1234567);
    if (rank) shape[0] = 0;
    const std::uint8_t one = 1;
    CHECK(io::npy_bytes(io::npy_dtype::u8, shape, &one).size() % 64 == (rank ? 0 : 1));
  }

  const auto with_header = [](const std::string& dict) {
    std::string h = dict;
    h.append((64 - (10 + h.size() + 1) % 64) % 64, ' ');
    h += '\n';
    std::string f("\x93NUMPY\x01\x00", 8);
    f += static_cast<char>(h.size() & 0xff);
    f += static_cast<char>(h.size() >> 8);
    f += h;
    std::vector<std::byte> out(f.size());
    std::memcpy(out.data(), f.data(), f.size());
    return out;
  };
  auto ok = with_header("{'shape': (2, 1), 'fortran_order': False, 'descr': '|u1'}");
  ok.push_back(std::byte{4});
  ok.push_back(std::byte{5});
  CHECK(io::parse_npy(ok, "k").values<std::int64_t>() == std::vector<std::int64_t>{4, 5});
  ok.push_back(std::byte{6});
  CHECK_THROWS_WITH(io::parse_npy(ok, "k"), Contains("3 bytes") && Contains("needs 2"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '>i8', 'fortran_order': False, 'shape': (0,), }"), "k"),
                    Contains("'>i8' is not supported"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '<i8', 'fortran_order': True, 'shape': (2, 2), }"), "k"),
                    Contains("Fortran"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '<i8', 'shape': (0,), }"), "k"), Contains("keys"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '<i8', 'fortran_order': False, 'shape': (3), }"), "k"),
                    Contains("trailing comma"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '<i8', 'fortran_order': False, 'shape': (-1,), }"), "k"),
                    Contains("non-negative"));
  CHECK_THROWS_WITH(io::parse_npy(with_header("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), 'x': 1}"), "k"),
                    Contains("unexpected key 'x'"));
  CHECK_THROWS_WITH(io::parse_npy(std::vector<std::byte>(5), "k"), Contains("not a .npy"));
}

TEST_CASE("npz: write, read back, and the ZIP structure", "[io][npz]") {
  temp_dir dir("npz");
  const promoe::index_t N = 4, H = 3, W = 5, C = 3;
  const bytes_t images = random_bytes(static_cast<std::size_t>(N * H * W * C), 11);
  const std::vector<std::int64_t> labels = {3, 0, 9, 1};
  const std::string path = dir.file("samples.npz");
  io::write_samples_npz(path, images, N, H, W, C, labels);
  CHECK(dir.entries() == std::vector<std::string>{"samples.npz"});

  const io::npz_file f = io::npz_file::read(path);
  CHECK(f.source() == path);
  CHECK(f.names() == std::vector<std::string>{"arr_0", "labels"});
  const auto& arr = f.at("arr_0");
  CHECK(arr.type == io::npy_dtype::u8);
  CHECK(arr.shape == std::vector<std::int64_t>{N, H, W, C});
  CHECK(arr.values<std::uint8_t>() == images);
  CHECK(f.at("labels").type == io::npy_dtype::i64);
  CHECK(f.at("labels").shape == std::vector<std::int64_t>{N});
  CHECK(f.at("labels").values<std::int64_t>() == labels);
  CHECK_THROWS_WITH(f.at("nope"), Contains(path) && Contains("no array 'nope'") && Contains("'arr_0', 'labels'"));

  // ZIP layout: local header at 0, stored, the .npy data 64-byte aligned within the member
  const bytes_t raw = read_bytes(path);
  REQUIRE(raw.size() > 100);
  CHECK(raw[0] == 'P');
  CHECK(raw[1] == 'K');
  CHECK(raw[2] == 3);
  CHECK(raw[3] == 4);
  CHECK(raw[8] == 0);  // method: stored
  const std::string first_name(reinterpret_cast<const char*>(&raw[30]), 9);
  CHECK(first_name == "arr_0.npy");
  const std::size_t npy_at = 30 + 9;
  CHECK(std::string(reinterpret_cast<const char*>(&raw[npy_at]), 6) == "\x93NUMPY");
  const std::size_t hlen = raw[npy_at + 8] + 256u * raw[npy_at + 9];
  CHECK((10 + hlen) % 64 == 0);
  CHECK(std::equal(images.begin(), images.end(), raw.begin() + static_cast<std::ptrdiff_t>(npy_at + 10 + hlen)));
  const std::uint32_t crc = static_cast<std::uint32_t>(crc32(0, &raw[npy_at], static_cast<uInt>(10 + hlen + images.size())));
  CHECK((raw[14] | raw[15] << 8 | raw[16] << 16 | std::uint32_t{raw[17]} << 24) == crc);
  CHECK(raw[raw.size() - 22] == 'P');
  CHECK(raw[raw.size() - 21] == 'K');
  CHECK(raw[raw.size() - 20] == 5);
  CHECK(raw[raw.size() - 19] == 6);
  CHECK(raw[raw.size() - 12] == 2);  // two entries

  SECTION("npz_writer: any arrays, bytes() equals the written file") {
    io::npz_writer w;
    const std::vector<float> fv = {0.5f, -1.25f, 3.0f};
    w.add("f", {3}, fv);
    w.add<std::uint8_t>("empty", {0, 2}, std::span<const std::uint8_t>());
    w.add<std::int64_t>("scalar", {}, std::vector<std::int64_t>{42});
    const std::string p2 = dir.file("any.npz");
    w.write(p2);
    const auto bytes = w.bytes();
    const bytes_t on_disk = read_bytes(p2);
    REQUIRE(bytes.size() == on_disk.size());
    CHECK(std::memcmp(bytes.data(), on_disk.data(), bytes.size()) == 0);
    const auto g = io::npz_file::parse(bytes, "any");
    CHECK(g.names() == std::vector<std::string>{"f", "empty", "scalar"});
    CHECK(g.at("f").values<float>() == fv);
    CHECK(g.at("empty").numel() == 0);
    CHECK(g.at("scalar").values<std::int64_t>() == std::vector<std::int64_t>{42});
  }
  SECTION("writer errors") {
    io::npz_writer w;
    w.add<std::uint8_t>("a", {2}, bytes_t{1, 2});
    CHECK_THROWS_WITH(w.add<std::uint8_t>("a", {2}, bytes_t{1, 2}), Contains("already added"));
    CHECK_THROWS_WITH(w.add<std::uint8_t>("a/b", {2}, bytes_t{1, 2}), Contains("printable ASCII"));
    CHECK_THROWS_WITH(w.add<std::uint8_t>("", {2}, bytes_t{1, 2}), Contains("1 to 1000"));
    CHECK_THROWS_WITH(w.add<std::uint8_t>("b", {3}, bytes_t{1, 2}), Contains("2 values for shape [3]"));
    CHECK_THROWS_WITH(w.add("c", io::npy_dtype::u8, {-1}, nullptr), Contains("negative"));
    CHECK_THROWS_WITH(w.add("d", io::npy_dtype::u8, {1LL << 32}, images.data()), Contains("ZIP64"));
    CHECK_THROWS_WITH(io::write_samples_npz(path, images, N, H, W, C, std::vector<std::int64_t>{1}),
                      Contains("1 labels for 4 images"));
    CHECK_THROWS_WITH(io::write_samples_npz(path, images, N, H, W, 2, labels), Contains("C 1, 3 or 4"));
    const std::string nowhere = dir.file("no/dir/x.npz");
    CHECK_THROWS_WITH(w.write(nowhere), Contains(nowhere) && Contains("cannot create the temporary file"));
    CHECK(dir.entries() == std::vector<std::string>{"samples.npz"});
  }
  SECTION("corrupt archives: errors naming the file, never a crash") {
    const std::string p = dir.file("bad.npz");
    const auto fails = [&](const bytes_t& b, const std::string& what) {
      write_bytes(p, b);
      CHECK_THROWS_AS(io::npz_file::read(p), promoe::error);
      CHECK_THROWS_WITH(io::npz_file::read(p), Contains(p) && Contains(what));
    };
    bytes_t b = raw;
    b[npy_at + 10 + hlen + 5] ^= 0x40;  // a pixel
    fails(b, "CRC-32 mismatch in member 'arr_0.npy'");
    fails(bytes_t(raw.begin(), raw.end() - 1), "no end of central directory");
    fails(bytes_t(raw.begin(), raw.begin() + 10), "not a ZIP archive");
    fails(bytes_t(raw.begin() + 1, raw.end()), "corrupt ZIP");
    b = raw;
    b[0] = 'X';
    fails(b, "bad local header signature");
    b = raw;
    b.insert(b.begin() + 100, std::uint8_t{0});
    fails(b, "corrupt ZIP");
    for (std::size_t n = 0; n < raw.size(); ++n)
      CHECK_THROWS_AS(io::npz_file::parse(as_bytes(bytes_t(raw.begin(), raw.begin() + static_cast<std::ptrdiff_t>(n))), "cut"),
                      promoe::error);
    int parsed = 0;
    for (std::size_t i = 0; i < raw.size(); ++i) {
      bytes_t m = raw;
      m[i] ^= 0x21;
      try {
        const auto g = io::npz_file::parse(as_bytes(m), "mutant.npz");
        CHECK(g.names().size() == 2);
        ++parsed;
      } catch (const promoe::error& e) {
        CHECK_THAT(e.what(), Contains("mutant.npz"));
      }
    }
    // Only the fields no check covers may change undetected: per member, "version needed" (2
    // bytes), time and date (4) in the local header, and "version made by", "version needed",
    // time, date, internal and external attributes (14) in the central directory: 2 x 20.
    CHECK(parsed <= 40);
  }
}

TEST_CASE("npz: NumPy reads what npz_writer writes, npz_file reads what NumPy writes", "[io][npz][numpy]") {
  if (!python_numpy_available()) {
    WARN("/usr/bin/python3 with numpy is not available; the NumPy checks are skipped");
    return;
  }
  temp_dir dir("npz_numpy");
  const promoe::index_t N = 3, H = 4, W = 2, C = 3;
  const bytes_t images = random_bytes(static_cast<std::size_t>(N * H * W * C), 21);
  const std::vector<std::int64_t> labels = {5, 0, 1234567890123};
  const std::string path = dir.file("samples.npz");
  io::write_samples_npz(path, images, N, H, W, C, labels);
  bool ok = false;
  const std::string out = run_command(
      "/usr/bin/python3 -c \"import numpy as np; d=np.load('" + path +
          "'); print(d['arr_0'].shape, d['arr_0'].dtype, int(d['arr_0'].sum()), [int(v) for v in d['labels']], "
          "d['labels'].dtype, sorted(d.files))\" 2>&1",
      ok);
  const long sum = std::accumulate(images.begin(), images.end(), 0L);
  CHECK(ok);
  CHECK(out == "(3, 4, 2, 3) uint8 " + std::to_string(sum) + " [5, 0, 1234567890123] int64 ['arr_0', 'labels']\n");

  // NumPy's own archives: np.savez (ZIP64 extra fields in the local headers) and
  // np.savez_compressed (deflated members).
  const std::string a = dir.file("np.npz"), z = dir.file("npz.npz");
  run_command("/usr/bin/python3 -c \"import numpy as np; "
              "x=np.arange(2*3*4, dtype=np.uint8).reshape(2,3,4); y=np.array([-1, 2**40], dtype=np.int64); "
              "f=np.linspace(0, 1, 5, dtype=np.float32); "
              "np.savez('" + a + "', x, labels=y, f=f); np.savez_compressed('" + z + "', x, labels=y, f=f)\" 2>&1",
              ok);
  REQUIRE(ok);
  for (const std::string& p : {a, z}) {
    CAPTURE(p);
    const auto f = io::npz_file::read(p);
    std::vector<std::string> names = f.names();
    std::sort(names.begin(), names.end());
    CHECK(names == std::vector<std::string>{"arr_0", "f", "labels"});
    CHECK(f.at("arr_0").shape == std::vector<std::int64_t>{2, 3, 4});
    bytes_t x(24);
    std::iota(x.begin(), x.end(), std::uint8_t{0});
    CHECK(f.at("arr_0").values<std::uint8_t>() == x);
    CHECK(f.at("labels").values<std::int64_t>() == std::vector<std::int64_t>{-1, 1LL << 40});
    CHECK(f.at("f").values<float>() == std::vector<float>{0.f, 0.25f, 0.5f, 0.75f, 1.f});
  }
  // A compressed member whose data is damaged: the inflate or the CRC check catches it.
  bytes_t zb = read_bytes(z);
  zb[80] ^= 0x55;
  write_bytes(z, zb);
  CHECK_THROWS_WITH(io::npz_file::read(z), Contains(z) && Contains("corrupt ZIP"));
}

// ---------------------------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------------------------

TEST_CASE("image_folder: one sub-folder per class", "[io][image_folder]") {
  temp_dir dir("folder");
  const fs::path root = dir.path / "data";
  fs::create_directories(root / "b_cat");
  fs::create_directories(root / "a_dog" / "nested");
  fs::create_directories(root / ".hidden");
  const promoe::index_t H = 3, W = 5;
  const bytes_t d0 = test_image(H, W, 3, 100), d1 = test_image(H, W, 3, 101), d2 = test_image(H, W, 3, 102);
  const bytes_t c0 = test_image(H, W, 1, 103);
  io::write_png((root / "a_dog" / "x.png").string(), d0, H, W, 3);
  io::write_png((root / "a_dog" / "nested" / "y.png").string(), d1, H, W, 3);
  io::write_png((root / "a_dog" / "Z.PNG").string(), d2, H, W, 3);
  io::write_png((root / "b_cat" / "only.png").string(), c0, H, W, 1);
  io::write_png((root / ".hidden" / "skip.png").string(), test_image(1, 1, 1, 1), 1, 1, 1);
  write_bytes((root / "a_dog" / "notes.txt").string(), {'h', 'i'});
  write_bytes((root / "README").string(), {'r'});

  const io::labelled_images rgb = io::load_image_folder(root.string(), 3);
  CHECK(rgb.class_names == std::vector<std::string>{"a_dog", "b_cat"});
  CHECK(rgb.N == 4);
  CHECK(rgb.H == H);
  CHECK(rgb.W == W);
  CHECK(rgb.C == 3);
  CHECK(rgb.labels == std::vector<std::int64_t>{0, 0, 0, 1});
  // order within a class: by path ("Z.PNG" < "nested/y.png" < "x.png")
  const auto img = [&](const io::labelled_images& d, promoe::index_t n) {
    const auto s = d.image(n);
    return bytes_t(s.begin(), s.end());
  };
  CHECK(img(rgb, 0) == d2);
  CHECK(img(rgb, 1) == d1);
  CHECK(img(rgb, 2) == d0);
  bytes_t c0_rgb;
  for (const auto v : c0) c0_rgb.insert(c0_rgb.end(), {v, v, v});
  CHECK(img(rgb, 3) == c0_rgb);

  const io::labelled_images gray = io::load_image_folder(root.string(), 1);
  CHECK(gray.C == 1);
  CHECK(img(gray, 3) == c0);
  const bytes_t g0 = img(gray, 2);
  for (std::size_t i = 0; i < g0.size(); ++i)
    CHECK(int{g0[i]} == (77 * d0[3 * i] + 150 * d0[3 * i + 1] + 29 * d0[3 * i + 2]) >> 8);

  // the result feeds write_samples_npz and image_grid directly
  io::write_samples_npz(dir.file("s.npz"), rgb.pixels, rgb.N, rgb.H, rgb.W, rgb.C, rgb.labels);
  CHECK(io::npz_file::read(dir.file("s.npz")).at("arr_0").values<std::uint8_t>() == rgb.pixels);
}

TEST_CASE("image_folder: errors name the folder or the file", "[io][image_folder]") {
  temp_dir dir("folder_bad");
  const fs::path root = dir.path / "data";
  fs::create_directories(root);
  CHECK_THROWS_WITH(io::load_image_folder((dir.path / "none").string(), 3), Contains("no such folder"));
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 2), Contains("channels is 2"));
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 3), Contains(root.string()) && Contains("no class sub-folders"));
  write_bytes((root / "file.png").string(), {1});
  CHECK_THROWS_WITH(io::load_image_folder((root / "file.png").string(), 3), Contains("not a folder"));
  fs::create_directories(root / "k0");
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 3), Contains("k0") && Contains("holds no .png files"));
  write_bytes((root / "k0" / "a.txt").string(), {1});
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 3), Contains("holds no .png files"));
  io::write_png((root / "k0" / "a.png").string(), test_image(4, 4, 3, 1), 4, 4, 3);
  CHECK(io::load_image_folder(root.string(), 3).N == 1);
  fs::create_directories(root / "k1");
  io::write_png((root / "k1" / "b.png").string(), test_image(4, 5, 3, 2), 4, 5, 3);
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 3),
                    Contains((root / "k1" / "b.png").string()) && Contains("5 x 4") && Contains("share one size"));
  io::write_png((root / "k1" / "b.png").string(), test_image(4, 4, 1, 2), 4, 4, 1);
  CHECK(io::load_image_folder(root.string(), 3).N == 2);
  bytes_t broken = io::encode_png(test_image(4, 4, 3, 3), 4, 4, 3);
  broken.resize(broken.size() - 3);
  write_bytes((root / "k1" / "c.png").string(), broken);
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 3),
                    Contains((root / "k1" / "c.png").string()) && Contains("truncated PNG"));
  write_bytes((root / "k1" / "c.png").string(), {'n', 'o', 't'});
  CHECK_THROWS_WITH(io::load_image_folder(root.string(), 1),
                    Contains((root / "k1" / "c.png").string()) && Contains("not a PNG"));
}

TEST_CASE("atomic_file: read_file_bytes and write_file_atomically", "[io][atomic]") {
  temp_dir dir("atomic");
  const std::string p = dir.file("f.bin");
  const bytes_t content = random_bytes(1000, 4);
  io::write_file_atomically(p, "test", as_bytes(content));
  const auto back = io::read_file_bytes(p);
  REQUIRE(back.size() == content.size());
  CHECK(std::memcmp(back.data(), content.data(), content.size()) == 0);
  CHECK(dir.entries() == std::vector<std::string>{"f.bin"});
  CHECK_THROWS_WITH(io::read_file_bytes(p, 999), Contains(p) && Contains("limit of 999"));
  CHECK_THROWS_WITH(io::read_file_bytes(dir.file("x")), Contains("no such file"));
  CHECK_THROWS_WITH(io::read_file_bytes(dir.path.string()), Contains("is a directory"));
  CHECK_THROWS_WITH(io::write_file_atomically((dir.path / "").string(), "who", as_bytes(content)),
                    Contains("who") && Contains("does not name a file"));
  fs::create_directory(dir.path / "d");
  CHECK_THROWS_WITH(io::write_file_atomically(dir.file("d"), "who", as_bytes(content)),
                    Contains("cannot move the temporary file"));
  CHECK(dir.entries() == std::vector<std::string>{"d", "f.bin"});
}

TEST_CASE("latents: a labelled latent set from safetensors, and its errors", "[io][latents]") {
  temp_dir dir("latents");
  const std::int64_t N = 3, C = 4, H = 2, W = 5;
  std::vector<double> values(static_cast<std::size_t>(N * C * H * W));
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = 0.25 * static_cast<double>(i) - 7.0;
  const std::vector<std::int32_t> labels{2, 0, 9};
  const auto write = [&](const std::string& name, auto&& edit) {
    io::safetensors_writer w;
    edit(w);
    w.write(dir.file(name));
    return dir.file(name);
  };
  const auto good = write("good.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C, H, W}, values);
    w.add("labels", {N}, labels);
  });
  const io::labelled_latents set = io::load_latents(good);
  CHECK(set.N == N);
  CHECK(set.C == C);
  CHECK(set.H == H);
  CHECK(set.W == W);
  CHECK(set.labels == std::vector<std::int64_t>{2, 0, 9});
  const auto s1 = set.sample(1);
  REQUIRE(s1.size() == static_cast<std::size_t>(C * H * W));
  for (std::size_t j = 0; j < s1.size(); ++j) CHECK(s1[j] == static_cast<float>(values[C * H * W + j]));
  CHECK_THROWS_WITH(set.sample(3), Contains("index 3 out of range"));

  const auto bad = [&](const std::string& name, auto&& edit, const std::string& message) {
    const auto path = write(name, edit);
    CHECK_THROWS_WITH(io::load_latents(path), Contains(name) && Contains(message));
  };
  bad("no_labels.safetensors", [&](io::safetensors_writer& w) { w.add("latents", {N, C, H, W}, values); },
      "'labels'");
  bad("rank.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C * H * W}, values);
    w.add("labels", {N}, labels);
  }, "expected [N, C, H, W]");
  bad("count.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C, H, W}, values);
    w.add("labels", {2}, std::vector<std::int32_t>{0, 1});
  }, "expected [3] (one per latent)");
  bad("negative.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C, H, W}, values);
    w.add("labels", {N}, std::vector<std::int32_t>{0, -1, 2});
  }, "holds -1 at index 1");
  auto nan = values;
  nan[static_cast<std::size_t>(2 * C * H * W + 6)] = std::nan("");
  bad("nan.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C, H, W}, nan);
    w.add("labels", {N}, labels);
  }, "at sample 2, element 6");
  bad("text_labels.safetensors", [&](io::safetensors_writer& w) {
    w.add("latents", {N, C, H, W}, values);
    w.add("labels", {N}, std::vector<float>{0, 1, 2});
  }, "'labels' has dtype F32");
}
