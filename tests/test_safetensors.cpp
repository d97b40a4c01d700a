// SPDX-License-Identifier: Apache-2.0
/// \file test_safetensors.cpp
/// \brief promoe::io safetensors: round trips of every dtype, byte-exact files as the reference
/// writer produces them, half-precision conversions, corrupt files (each a promoe::error that
/// names the problem), a deterministic mutation loop, and atomic writes.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <csignal>
#include <sys/resource.h>
#include <unistd.h>
#define PROMOE_TEST_POSIX 1
#else
#define PROMOE_TEST_POSIX 0
#endif

#include <catch2/catch.hpp>

#include <promoe/io/safetensors.hpp>

#include "temp_dir.hpp"

using Catch::Contains;
using promoe::io::dtype;
using promoe::io::safetensors_file;
using promoe::io::safetensors_writer;
namespace fs = std::filesystem;

namespace {

using bytes_t = std::vector<std::byte>;

bytes_t to_bytes(const std::string& s) {
  bytes_t out(s.size());
  if (!s.empty()) std::memcpy(out.data(), s.data(), s.size());
  return out;
}

std::string to_string(const bytes_t& b) { return std::string(reinterpret_cast<const char*>(b.data()), b.size()); }

template <class T>
bytes_t raw(const std::vector<T>& v) {
  bytes_t out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

bytes_t le64(std::uint64_t n) {
  bytes_t out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  return out;
}

/// A file from a header text and a buffer; the header padded with spaces to a multiple of 8
/// unless pad is false.
bytes_t make_file(std::string header, const bytes_t& buffer = {}, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  bytes_t out = le64(header.size());
  const bytes_t h = to_bytes(header);
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), buffer.begin(), buffer.end());
  return out;
}

safetensors_file parse(const bytes_t& b) { return safetensors_file::parse(b, "test.safetensors"); }

using promoe_test::temp_dir;

bool has_temp_file(const temp_dir& d) {
  for (const auto& name : d.entries())
    if (name.find(".tmp.") != std::string::npos) return true;
  return false;
}

/// Independent reference for binary16: value = (-1)^s * 2^(e-15) * (1 + m/1024), or subnormal.
double f16_reference(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double sign = s ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(static_cast<double>(m), -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

/// A valid file with several dtypes and metadata, the seed of the mutation loop.
bytes_t sample_file() {
  safetensors_writer w;
  w.add("experts.0.w1", {2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6});
  w.add("experts.0.b1", {3}, std::vector<double>{0.5, -0.5, 2});
  w.add("router.idx", {2}, std::vector<std::int64_t>{7, -9});
  const std::vector<std::uint16_t> half{0x3C00, 0xC100};
  w.add("h", dtype::f16, {2}, half.data());
  w.add("s", {}, std::vector<std::uint8_t>{200});
  w.set_metadata("format", "pt");
  return w.bytes();
}

/// Touches everything a successfully parsed file offers.
void exercise(const safetensors_file& f) {
  for (const auto& name : f.names()) {
    const auto& e = f.at(name);
    CHECK(f.data(name).size() == e.nbytes());
    switch (e.type) {
      case dtype::f64:
      case dtype::f32:
      case dtype::f16:
      case dtype::bf16: CHECK(f.values<double>(name).size() == static_cast<std::size_t>(e.numel())); break;
      default: CHECK(f.values<std::int64_t>(name).size() == static_cast<std::size_t>(e.numel()));
    }
  }
  (void)f.metadata();
}

}  // namespace

TEST_CASE("safetensors: round trip of every dtype and shape", "[safetensors]") {
  const std::vector<double> f64{1.5, -2.25, 1e300, -0.0, 3, 4};
  const std::vector<float> f32{1, -2, 3.5f, 1e-30f};
  const std::vector<std::uint16_t> f16{0x3C00, 0xC100, 0x7BFF};  // 1, -2.5, 65504
  const std::vector<std::uint16_t> bf16{0x3F80, 0xC020};         // 1, -2.5
  const std::vector<std::int64_t> i64{-5, std::int64_t{1} << 40};
  const std::vector<std::int32_t> i32{1, -2, 2147483647, -2147483647 - 1};
  const std::vector<std::int16_t> i16{-32768, 0, 32767};
  const std::vector<std::int8_t> i8{-128, 0, 127};
  const std::vector<std::uint8_t> u8{0, 1, 254, 255};
  const std::vector<std::uint8_t> flags{1, 0, 1};

  safetensors_writer w;
  w.add("f64", {2, 3}, f64);
  w.add("f32", {4}, f32);
  w.add("f16", dtype::f16, {3}, f16.data());
  w.add("bf16", dtype::bf16, {1, 2}, bf16.data());
  w.add("i64", {2}, i64);
  w.add("i32", {2, 2}, i32);
  w.add("i16", {3}, i16);
  w.add("i8", {3, 1}, i8);
  w.add("u8", {2, 1, 2}, u8);
  w.add("bool", dtype::boolean, {3}, flags.data());
  w.add("scalar", {}, std::vector<float>{3.5f});
  w.add("empty", {0, 4}, std::vector<float>{});
  w.add("empty_i64", dtype::i64, {3, 0}, nullptr);

  temp_dir dir("roundtrip");
  const std::string path = (dir.path / "all.safetensors").string();
  w.write(path);
  const auto from_bytes = parse(w.bytes());
  const auto from_disk = safetensors_file::read(path);
  CHECK(from_disk.source() == path);
  {
    std::ifstream in(path, std::ios::binary);
    const std::string disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(disk == to_string(w.bytes()));
  }

  for (const safetensors_file* f : {&from_bytes, &from_disk}) {
    CHECK(f->names() == std::vector<std::string>{"bf16", "bool", "empty", "empty_i64", "f16", "f32", "f64", "i16",
                                                 "i32", "i64", "i8", "scalar", "u8"});
    CHECK(f->metadata().empty());
    CHECK(f->at("f64").type == dtype::f64);
    CHECK(f->at("bool").type == dtype::boolean);
    CHECK(f->at("f64").shape == std::vector<std::int64_t>{2, 3});
    CHECK(f->values<double>("f64") == f64);
    CHECK(f->values<double>("f64", {2, 3}) == f64);
    CHECK(f->values<float>("f32") == f32);
    CHECK(f->values<double>("f32") == std::vector<double>(f32.begin(), f32.end()));
    CHECK(f->values<float>("f16") == std::vector<float>{1.0f, -2.5f, 65504.0f});
    CHECK(f->values<float>("bf16", {1, 2}) == std::vector<float>{1.0f, -2.5f});
    CHECK(f->values<std::int64_t>("i64") == i64);
    CHECK(f->values<std::int64_t>("i32") == std::vector<std::int64_t>(i32.begin(), i32.end()));
    CHECK(f->values<std::int64_t>("i16") == std::vector<std::int64_t>(i16.begin(), i16.end()));
    CHECK(f->values<std::int64_t>("i8", {3, 1}) == std::vector<std::int64_t>(i8.begin(), i8.end()));
    CHECK(f->values<std::int64_t>("u8") == std::vector<std::int64_t>{0, 1, 254, 255});
    CHECK(f->values<std::int64_t>("bool") == std::vector<std::int64_t>{1, 0, 1});
    // Raw bytes come back exactly (F16 and BF16 included).
    const auto f16_bytes = f->data("f16");
    CHECK(bytes_t(f16_bytes.begin(), f16_bytes.end()) == raw(f16));
    const auto bf16_bytes = f->data("bf16");
    CHECK(bytes_t(bf16_bytes.begin(), bf16_bytes.end()) == raw(bf16));
    // A 0-dim scalar has shape [] and one element; a 0 dimension means no bytes.
    CHECK(f->at("scalar").shape.empty());
    CHECK(f->at("scalar").numel() == 1);
    CHECK(f->values<float>("scalar", {}) == std::vector<float>{3.5f});
    CHECK(f->at("empty").shape == std::vector<std::int64_t>{0, 4});
    CHECK(f->at("empty").nbytes() == 0);
    CHECK(f->values<float>("empty", {0, 4}).empty());
    CHECK(f->values<std::int64_t>("empty_i64", {3, 0}).empty());
    // The reference layout: the header is a multiple of 8 bytes and larger dtypes come first,
    // so every tensor is aligned to its element size in the file.
    for (const auto& name : f->names()) {
      const auto& e = f->at(name);
      CHECK(e.begin % promoe::io::dtype_size(e.type) == 0);
    }
  }
}

TEST_CASE("safetensors: metadata round trip and string escapes", "[safetensors]") {
  safetensors_writer w;
  w.set_metadata("format", "pt");
  w.set_metadata("quote\"back\\slash", "line\nbreak\ttab\x01\x1f end");
  w.set_metadata("unicode", "caf\xc3\xa9 \xf0\x9f\x98\x80");
  w.set_metadata("format", "np");  // replaces
  const std::string weird = "w/\"eird\"\n\\name";
  w.add(weird, {1}, std::vector<float>{1});
  const bytes_t b = w.bytes();
  const std::string header = to_string(b).substr(8);
  CHECK(header.find(R"("quote\"back\\slash":"line\nbreak\ttab\u0001\u001f end")") != std::string::npos);
  CHECK(header.find(R"("w/\"eird\"\n\\name":{)") != std::string::npos);
  CHECK(header.rfind("{\"__metadata__\":{", 0) == 0);

  const auto f = parse(b);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "np"},
                                                           {"quote\"back\\slash", "line\nbreak\ttab\x01\x1f end"},
                                                           {"unicode", "caf\xc3\xa9 \xf0\x9f\x98\x80"}});
  CHECK(f.names() == std::vector<std::string>{weird});
  CHECK(f.values<float>(weird) == std::vector<float>{1});

  SECTION("escapes a reader must accept: \\u with surrogate pairs, \\/, pretty printing") {
    const std::string h = "{\n  \"__metadata__\" : { \"k\\u00e9\\ud83d\\ude00\\/\" : \"\\b\\f\\r\" } ,\n"
                          "  \"a\" : { \"shape\" : [ ] , \"data_offsets\" : [ 0 , 4 ] , \"dtype\" : \"F32\","
                          " \"extra\": [true, false, null, {\"x\": -1.5e+3}] }\n}\n";
    const auto g = parse(make_file(h, raw(std::vector<float>{2})));
    CHECK(g.metadata().at("k\xc3\xa9\xf0\x9f\x98\x80/") == "\b\f\r");
    CHECK(g.values<float>("a") == std::vector<float>{2});
  }
  SECTION("\"__metadata__\": null is no metadata") {
    const auto g = parse(make_file(R"({"__metadata__":null})"));
    CHECK(g.metadata().empty());
    CHECK(g.names().empty());
  }
}

TEST_CASE("safetensors: byte-exact files as the reference writer produces them", "[safetensors]") {
  SECTION("one F32 tensor 'a' of shape [2]") {
    safetensors_writer w;
    w.add("a", {2}, std::vector<float>{1, 2});
    const std::string json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    REQUIRE(json.size() == 54);
    bytes_t expected = le64(56);
    const bytes_t h = to_bytes(json + "  ");
    expected.insert(expected.end(), h.begin(), h.end());
    for (const int v : {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40}) expected.push_back(static_cast<std::byte>(v));
    CHECK(w.bytes() == expected);
    CHECK(parse(expected).values<float>("a", {2}) == std::vector<float>{1, 2});
  }
  // The byte vectors of the reference crate's own serialization tests (safetensors/src/tensor.rs).
  SECTION("empty file, and empty file with metadata") {
    safetensors_writer w;
    const std::vector<int> empty{8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32};
    bytes_t expected;
    for (const int v : empty) expected.push_back(static_cast<std::byte>(v));
    CHECK(w.bytes() == expected);
    CHECK(parse(expected).names().empty());

    w.set_metadata("framework", "pt");
    CHECK(w.bytes() == make_file(R"({"__metadata__":{"framework":"pt"}})"));
    CHECK(w.bytes().size() == 48);
    CHECK(w.bytes()[0] == std::byte{40});
    CHECK(parse(w.bytes()).metadata().at("framework") == "pt");
  }
  SECTION("attn.0 [1, 2, 3] needs no padding; attn0 [1, 1, 2, 3] needs 7 spaces") {
    const std::vector<float> v{0, 1, 2, 3, 4, 5};
    safetensors_writer w1;
    w1.add("attn.0", {1, 2, 3}, v);
    bytes_t e1 = make_file(R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})", raw(v));
    CHECK(e1[0] == std::byte{64});
    CHECK(w1.bytes() == e1);
    safetensors_writer w2;
    w2.add("attn0", {1, 1, 2, 3}, v);
    const bytes_t e2 = make_file(R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})", raw(v));
    CHECK(e2[0] == std::byte{72});
    CHECK(to_string(e2).substr(8 + 65) == std::string(7, ' ') + to_string(raw(v)));
    CHECK(w2.bytes() == e2);
  }
  SECTION("order: larger dtypes first, then by name (header and buffer alike)") {
    safetensors_writer w;
    w.add("a", {1}, std::vector<std::uint8_t>{1});
    w.add("b", {1}, std::vector<float>{2});
    w.add("c", {1}, std::vector<double>{3});
    w.add("d", {1}, std::vector<float>{4});
    const std::string json = "{\"c\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
                             "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                             "\"d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]},"
                             "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[16,17]}}";
    bytes_t buffer = raw(std::vector<double>{3});
    for (const auto& part : {raw(std::vector<float>{2}), raw(std::vector<float>{4}), raw(std::vector<std::uint8_t>{1})})
      buffer.insert(buffer.end(), part.begin(), part.end());
    CHECK(w.bytes() == make_file(json, buffer));
    const auto f = parse(w.bytes());
    CHECK(f.names() == std::vector<std::string>{"a", "b", "c", "d"});
    CHECK(f.values<double>("d") == std::vector<double>{4});
  }
}

TEST_CASE("safetensors: F16 and BF16 to float", "[safetensors]") {
  using promoe::io::bf16_to_float;
  using promoe::io::f16_to_float;
  CHECK(f16_to_float(0x3C00) == 1.0f);
  CHECK(f16_to_float(0xC100) == -2.5f);
  CHECK(f16_to_float(0x7BFF) == 65504.0f);
  CHECK(f16_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_float(0x03FF) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(f16_to_float(0x0400) == std::ldexp(1.0f, -14));     // smallest normal
  CHECK(f16_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(f16_to_float(0x3555) == 0.333251953125f);
  CHECK(f16_to_float(0x0000) == 0.0f);
  CHECK_FALSE(std::signbit(f16_to_float(0x0000)));
  CHECK(std::signbit(f16_to_float(0x8000)));
  CHECK(f16_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(f16_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f16_to_float(0x7E00)));
  CHECK(std::isnan(f16_to_float(0x7C01)));  // signalling NaN stays NaN, not inf
  CHECK(std::isnan(f16_to_float(0xFE00)));

  // Every one of the 65536 halves against an independent formula.
  int mismatches = 0;
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float got = f16_to_float(static_cast<std::uint16_t>(h));
    const double want = f16_reference(static_cast<std::uint16_t>(h));
    const bool ok = std::isnan(want) ? std::isnan(got)
                                     : (static_cast<double>(got) == want && std::signbit(got) == std::signbit(want));
    mismatches += ok ? 0 : 1;
  }
  CHECK(mismatches == 0);

  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC020) == -2.5f);
  CHECK(bf16_to_float(0x477F) == 65280.0f);
  CHECK(bf16_to_float(0x4780) == 65536.0f);  // 65504 rounds to this in bf16
  CHECK(bf16_to_float(0x0001) == std::ldexp(1.0f, -133));  // smallest subnormal
  CHECK(bf16_to_float(0x0080) == std::ldexp(1.0f, -126));
  CHECK(bf16_to_float(0x7F80) == std::numeric_limits<float>::infinity());
  CHECK(bf16_to_float(0xFF80) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bf16_to_float(0x7FC0)));
  CHECK(std::isnan(bf16_to_float(0x7F81)));
  CHECK(std::signbit(bf16_to_float(0x8000)));

  SECTION("through a file, as float and as double") {
    const std::vector<std::uint16_t> h{0x3C00, 0xC100, 0x7BFF, 0x0001, 0x7C00, 0x7E00};
    const std::vector<std::uint16_t> b{0x3F80, 0xC020, 0x4780, 0x0001, 0xFF80, 0x7FC0};
    safetensors_writer w;
    w.add("h", dtype::f16, {6}, h.data());
    w.add("b", dtype::bf16, {2, 3}, b.data());
    const auto f = parse(w.bytes());
    const auto hf = f.values<float>("h");
    const auto hd = f.values<double>("h");
    const auto bf = f.values<float>("b");
    CHECK(hf[0] == 1.0f);
    CHECK(hf[1] == -2.5f);
    CHECK(hf[2] == 65504.0f);
    CHECK(hd[3] == std::ldexp(1.0, -24));
    CHECK(std::isinf(hd[4]));
    CHECK(std::isnan(hd[5]));
    CHECK(bf[0] == 1.0f);
    CHECK(bf[1] == -2.5f);
    CHECK(bf[2] == 65536.0f);
    CHECK(bf[3] == std::ldexp(1.0f, -133));
    CHECK(bf[4] == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(bf[5]));
  }
}

TEST_CASE("safetensors: corrupt files are promoe::errors naming the problem", "[safetensors][errors]") {
  const bytes_t eight = raw(std::vector<float>{1, 2});
  const auto tensor = [](const std::string& name, const std::string& dt, const std::string& shape,
                         const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":\"" + dt + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
  };
  const std::string a = tensor("a", "F32", "[2]", "[0,8]");

  SECTION("the valid base file parses") { CHECK(parse(make_file("{" + a + "}", eight)).names().size() == 1); }
  SECTION("shorter than 8 bytes") {
    const bytes_t good = make_file("{" + a + "}", eight);
    for (std::size_t n = 0; n < 8; ++n) {
      const bytes_t cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
      REQUIRE_THROWS_AS(parse(cut), promoe::error);
      REQUIRE_THROWS_WITH(parse(cut), Contains("test.safetensors") && Contains("too short") &&
                                          Contains(std::to_string(n) + " bytes"));
    }
  }
  SECTION("header length past the end, or absurd") {
    bytes_t b = make_file("{" + a + "}", eight);
    const bytes_t len = le64(b.size() - 7);
    std::copy(len.begin(), len.end(), b.begin());
    REQUIRE_THROWS_WITH(parse(b), Contains("header length") && Contains("runs past the end of the file"));
    const bytes_t huge = le64(100'000'001);
    std::copy(huge.begin(), huge.end(), b.begin());
    REQUIRE_THROWS_WITH(parse(b), Contains("header length 100000001 exceeds the limit"));
    const bytes_t max = le64(std::numeric_limits<std::uint64_t>::max());
    std::copy(max.begin(), max.end(), b.begin());
    REQUIRE_THROWS_WITH(parse(b), Contains("exceeds the limit"));
  }
  SECTION("invalid JSON") {
    const std::string full = "{" + a + "}";
    REQUIRE_THROWS_WITH(parse(make_file(full.substr(0, full.size() - 1), eight, false)),
                        Contains("not valid JSON") && Contains("unexpected end of the header"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + a + ",}", eight)), Contains("not valid JSON") && Contains("trailing comma"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2,],"data_offsets":[0,8]}})", eight)),
                        Contains("trailing comma before ']'"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":"bad \q escape"}})")),
                        Contains("not valid JSON") && Contains("invalid escape '\\q'"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":"\u12G4"}})")), Contains("invalid \\u escape"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":"\udc00"}})")), Contains("lone low surrogate"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":"\ud800x"}})")),
                        Contains("high surrogate not followed by a low surrogate"));
    REQUIRE_THROWS_WITH(parse(make_file("{\"__metadata__\":{\"k\":\"a\nb\"}}")), Contains("unescaped control character"));
    REQUIRE_THROWS_WITH(parse(make_file("{\"__metadata__\":{\"k\":\"\xff\"}}")), Contains("invalid UTF-8"));
    REQUIRE_THROWS_WITH(parse(make_file("{\"__metadata__\":{\"k\":\"\xc0\xaf\"}}")), Contains("invalid UTF-8"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}})", eight)),
                        Contains("leading zero"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a" {"dtype":"F32"}})")), Contains("expected ':'"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({a:1})")), Contains("expected a string key"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + a + "} x", eight)), Contains("after the header object"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + a + "}" + std::string(2, '\0'), eight, false)), Contains("after the header object"));
    REQUIRE_THROWS_WITH(parse(make_file("")), Contains("the header is empty"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","x":tru}})")), Contains("invalid literal"));
    const std::string deep = R"({"a":{"dtype":"F32","x":)" + std::string(100, '[') + std::string(100, ']') + "}}";
    REQUIRE_THROWS_WITH(parse(make_file(deep)), Contains("nesting deeper than 64 levels"));
  }
  SECTION("valid JSON that is not a safetensors header") {
    REQUIRE_THROWS_WITH(parse(make_file("[]")), Contains("the header must be a JSON object, found an array"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":[1]})")), Contains("tensor 'a'") && Contains("must be an object"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", eight)),
                        Contains("tensor 'a': missing \"dtype\""));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", eight)),
                        Contains("tensor 'a': missing \"shape\""));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2]}})", eight)),
                        Contains("tensor 'a': missing \"data_offsets\""));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":3,"shape":[2],"data_offsets":[0,8]}})", eight)),
                        Contains("\"dtype\" must be a string, found a number"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight)),
                        Contains("\"dtype\" appears twice"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", eight)),
                        Contains("\"shape\" must be an array of non-negative integers, found a string"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight)),
                        Contains("tensor 'a'") && Contains("non-negative integers, found -2"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", eight)),
                        Contains("non-negative integers, found 2.0"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}})", eight)),
                        Contains("non-negative integers, found 2e0"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[null],"data_offsets":[0,8]}})", eight)),
                        Contains("non-negative integers, found null"));
    REQUIRE_THROWS_WITH(
        parse(make_file(R"({"a":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]}})", eight)),
        Contains("holds 99999999999999999999, which is too large"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", eight)),
                        Contains("\"data_offsets\" must be [begin, end], found 1 entries"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", eight)),
                        Contains("non-negative integers, found -8"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":1}})")),
                        Contains("\"__metadata__\" value of 'k' must be a string, found a number"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{"k":"1","k":"2"}})")),
                        Contains("\"__metadata__\" key 'k' appears twice"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":[]})")),
                        Contains("\"__metadata__\" must be an object of strings, found an array"));
    REQUIRE_THROWS_WITH(parse(make_file(R"({"__metadata__":{},"__metadata__":{}})")),
                        Contains("\"__metadata__\" appears twice"));
  }
  SECTION("unknown dtype") {
    for (const std::string dt : {"F31", "f32", "U16", "F8_E4M3", ""}) {
      REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", dt, "[2]", "[0,8]") + "}", eight)),
                          Contains("tensor 'a'") && Contains("unknown or unsupported dtype '" + dt + "'") &&
                              Contains("supported: F64, F32"));
    }
  }
  SECTION("byte ranges") {
    REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", "F32", "[3]", "[0,8]") + "}", eight)),
                        Contains("tensor 'a'") && Contains("span 8 bytes") && Contains("shape [3] of F32 needs 12"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", "F64", "[2]", "[0,8]") + "}", eight)),
                        Contains("shape [2] of F64 needs 16"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", "F32", "[4]", "[0,16]") + "}", eight)),
                        Contains("tensor 'a'") && Contains("[0, 16] run past the end of the 8-byte buffer"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", "F32", "[0]", "[8,0]") + "}", eight)),
                        Contains("tensor 'a'") && Contains("begin > end"));
    REQUIRE_THROWS_WITH(
        parse(make_file("{" + tensor("a", "F32", "[4294967296,4294967296]", "[0,8]") + "}", eight)),
        Contains("tensor 'a'") && Contains("overflows"));
    const bytes_t twelve = raw(std::vector<float>{1, 2, 3});
    REQUIRE_THROWS_WITH(
        parse(make_file("{" + a + "," + tensor("b", "F32", "[2]", "[4,12]") + "}", twelve)),
        Contains("tensor 'b' (bytes [4, 12)) overlaps tensor 'a' (bytes [0, 8))"));
    REQUIRE_THROWS_WITH(
        parse(make_file("{" + a + "," + tensor("b", "F32", "[2]", "[0,8]") + "}", eight)), Contains("overlaps"));
    REQUIRE_THROWS_WITH(
        parse(make_file("{" + tensor("a", "F32", "[1]", "[0,4]") + "," + tensor("b", "F32", "[1]", "[8,12]") + "}", twelve)),
        Contains("bytes [4, 8) of the buffer belong to no tensor") && Contains("'b'"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + tensor("a", "F32", "[1]", "[4,8]") + "}", eight)),
                        Contains("bytes [0, 4) of the buffer belong to no tensor"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + a + "}", twelve)),
                        Contains("the tensors cover 8 bytes but the buffer has 12") && Contains("trailing bytes"));
    REQUIRE_THROWS_WITH(parse(make_file("{}", eight)), Contains("the tensors cover 0 bytes but the buffer has 8"));
    REQUIRE_THROWS_WITH(parse(make_file("{" + a + "," + a + "}", eight)),
                        Contains("test.safetensors") && Contains("tensor 'a' appears twice"));
  }
  SECTION("accepted: any order of tensors in the header, zero-size tensors anywhere on the boundary") {
    const bytes_t twelve = raw(std::vector<float>{1, 2, 3});
    const auto f = parse(make_file("{" + tensor("z", "F32", "[1]", "[0,4]") + "," + tensor("e", "I64", "[0,3]", "[4,4]") +
                                   "," + tensor("a", "F32", "[2]", "[4,12]") + "," +
                                   tensor("e2", "U8", "[0]", "[12,12]") + "}",
                                   twelve));
    CHECK(f.names() == std::vector<std::string>{"a", "e", "e2", "z"});
    CHECK(f.values<float>("a") == std::vector<float>{2, 3});
    CHECK(f.values<float>("z") == std::vector<float>{1});
  }
  SECTION("values<T> on a dtype it does not read, a missing tensor, the wrong shape") {
    safetensors_writer w;
    w.add("ints", {2, 3}, std::vector<std::int32_t>{1, 2, 3, 4, 5, 6});
    w.add("x", {2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6});
    const auto f = parse(w.bytes());
    REQUIRE_THROWS_AS(f.values<float>("ints"), promoe::error);
    REQUIRE_THROWS_WITH(f.values<float>("ints"), Contains("test.safetensors") && Contains("tensor 'ints' has dtype I32") &&
                                                     Contains("values<float> reads F64, F32, F16 or BF16"));
    REQUIRE_THROWS_WITH(f.values<std::int64_t>("x"),
                        Contains("tensor 'x' has dtype F32") && Contains("values<int64_t> reads I64"));
    REQUIRE_THROWS_WITH(f.values<double>("nope"),
                        Contains("no tensor 'nope'") && Contains("the file has 2 tensors: 'ints', 'x'"));
    REQUIRE_THROWS_WITH(f.at("nope"), Contains("no tensor 'nope'"));
    REQUIRE_THROWS_WITH(f.data("nope"), Contains("no tensor 'nope'"));
    CHECK_FALSE(f.contains("nope"));
    CHECK(f.contains("x"));
    REQUIRE_THROWS_WITH(f.values<float>("x", {2, 4}), Contains("tensor 'x' has shape [2, 3], expected [2, 4]"));
    REQUIRE_THROWS_WITH(parse(make_file("{}")).at("w"), Contains("no tensor 'w' (the file has no tensors)"));
    safetensors_writer many;
    for (int i = 0; i < 20; ++i) many.add("t" + std::to_string(100 + i), {}, std::vector<float>{1});
    REQUIRE_THROWS_WITH(parse(many.bytes()).at("w"), Contains("20 tensors: 't100', 't101'") && Contains("'t107', ..."));
  }
  SECTION("read(): the path in every message") {
    temp_dir dir("read_errors");
    const std::string missing = (dir.path / "missing.safetensors").string();
    REQUIRE_THROWS_WITH(safetensors_file::read(missing), Contains(missing) && Contains("cannot open"));
    REQUIRE_THROWS_WITH(safetensors_file::read(dir.path.string()), Contains("is a directory"));
    const std::string shorty = (dir.path / "short.safetensors").string();
    std::ofstream(shorty, std::ios::binary) << "abc";
    REQUIRE_THROWS_WITH(safetensors_file::read(shorty), Contains(shorty) && Contains("file has 3 bytes, too short"));
    const std::string bad = (dir.path / "bad.safetensors").string();
    {
      const bytes_t b = make_file("{" + a + "}", raw(std::vector<float>{1, 2, 3}));
      std::ofstream(bad, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    }
    REQUIRE_THROWS_WITH(safetensors_file::read(bad), Contains(bad) && Contains("the buffer has 12"));
    const std::string past = (dir.path / "past.safetensors").string();
    {
      bytes_t b = make_file("{" + a + "}", eight);
      const bytes_t len = le64(1000);
      std::copy(len.begin(), len.end(), b.begin());
      std::ofstream(past, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    }
    REQUIRE_THROWS_WITH(safetensors_file::read(past), Contains(past) && Contains("header length 1000 runs past the end"));
  }
}

TEST_CASE("safetensors: the writer rejects bad tensors", "[safetensors][errors]") {
  safetensors_writer w;
  w.add("a", {2}, std::vector<float>{1, 2});
  REQUIRE_THROWS_WITH(w.add("a", {1}, std::vector<float>{1}), Contains("tensor 'a' was already added"));
  REQUIRE_THROWS_WITH(w.add("b", {2, 3}, std::vector<float>{1, 2}),
                      Contains("tensor 'b': 2 values for shape [2, 3] (6 elements)"));
  REQUIRE_THROWS_WITH(w.add("c", {2, -3}, std::vector<float>{}), Contains("negative dimension in shape [2, -3]"));
  REQUIRE_THROWS_WITH(w.add("c", dtype::f32, {-1}, nullptr), Contains("negative dimension"));
  REQUIRE_THROWS_WITH(w.add("c", dtype::f32, {2}, nullptr), Contains("tensor 'c': data is null"));
  REQUIRE_THROWS_WITH(w.add("c", dtype::f32, {std::int64_t{1} << 40, std::int64_t{1} << 40}, nullptr),
                      Contains("is too large"));
  REQUIRE_THROWS_WITH(w.add("__metadata__", {1}, std::vector<float>{1}), Contains("'__metadata__' is reserved"));
  REQUIRE_THROWS_WITH(w.add("bad\xff", {1}, std::vector<float>{1}), Contains("not valid UTF-8"));
  REQUIRE_THROWS_WITH(w.set_metadata("k", "\xc3"), Contains("metadata value") && Contains("not valid UTF-8"));
  CHECK(parse(w.bytes()).names() == std::vector<std::string>{"a"});
}

TEST_CASE("safetensors: mutated files parse or throw promoe::error, never crash", "[safetensors][fuzz]") {
  const bytes_t good = sample_file();
  {
    const auto f = parse(good);
    exercise(f);
    REQUIRE(f.names().size() == 5);
  }
  std::size_t accepted = 0, rejected = 0;
  const auto attempt = [&](const bytes_t& b) {
    try {
      exercise(parse(b));
      ++accepted;
    } catch (const promoe::error&) {
      ++rejected;
    }
  };
  const std::size_t header_end = 8 + static_cast<std::size_t>(std::to_integer<unsigned>(good[0])) +
                                 256 * static_cast<std::size_t>(std::to_integer<unsigned>(good[1]));
  // Every byte flipped by a few masks, and every header byte replaced by JSON punctuation.
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (const unsigned mask : {0x01u, 0x08u, 0x20u, 0x80u, 0xFFu}) {
      bytes_t b = good;
      b[i] ^= static_cast<std::byte>(mask);
      attempt(b);
    }
    if (i >= 8 && i < header_end) {
      for (const char c : std::string("{}[]\":,-0 9e.\\u")) {
        bytes_t b = good;
        b[i] = static_cast<std::byte>(c);
        attempt(b);
      }
    }
  }
  // Every truncation.
  for (std::size_t n = 0; n < good.size(); ++n) attempt(bytes_t(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n)));
  // Every plausible header length, and absurd ones.
  std::vector<std::uint64_t> lengths;
  for (std::uint64_t n = 0; n <= good.size() + 8; ++n) lengths.push_back(n);
  for (const std::uint64_t n : {std::uint64_t{1} << 31, std::uint64_t{1} << 32, std::uint64_t{100'000'000},
                                std::uint64_t{100'000'001}, std::uint64_t{1} << 63, ~std::uint64_t{0},
                                ~std::uint64_t{0} - 7})
    lengths.push_back(n);
  for (const std::uint64_t n : lengths) {
    bytes_t b = good;
    const bytes_t len = le64(n);
    std::copy(len.begin(), len.end(), b.begin());
    attempt(b);
  }
  // Deterministic random multi-byte mutations (a 64-bit LCG).
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  const auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  for (int iter = 0; iter < 3000; ++iter) {
    bytes_t b = good;
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int k = 0; k < edits; ++k) {
      const std::size_t pos = next() % b.size();
      switch (next() % 4) {
        case 0: b[pos] = static_cast<std::byte>(next() & 0xff); break;
        case 1: b[pos] = static_cast<std::byte>("0123456789,[]{}\" "[next() % 17]); break;
        case 2: b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos)); break;
        default: b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos), static_cast<std::byte>(next() & 0xff));
      }
      if (b.empty()) break;
    }
    attempt(b);
  }
  INFO("accepted " << accepted << ", rejected " << rejected);
  CHECK(accepted > 0);
  CHECK(rejected > 0);
  CHECK(accepted + rejected > 5000);
}

TEST_CASE("safetensors: atomic write", "[safetensors][write]") {
  temp_dir dir("atomic");
  const std::string path = (dir.path / "model.safetensors").string();
  safetensors_writer v1;
  v1.add("w", {2}, std::vector<float>{1, 2});
  v1.set_metadata("version", "1");
  v1.write(path);
  CHECK(safetensors_file::read(path).values<float>("w") == std::vector<float>{1, 2});

  safetensors_writer v2;
  v2.add("w", {3}, std::vector<float>{3, 4, 5});
  std::vector<float> big(1000, 0.5f);
  v2.add("big", {1000}, big);
  v2.set_metadata("version", "2");

  SECTION("overwriting replaces the file and leaves no temporary file") {
    v2.write(path);
    const auto f = safetensors_file::read(path);
    CHECK(f.metadata().at("version") == "2");
    CHECK(f.values<float>("w", {3}) == std::vector<float>{3, 4, 5});
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  }
  SECTION("a target that is a directory: error, the directory untouched, no temporary file") {
    const fs::path target = dir.path / "is_a_dir";
    fs::create_directory(target);
    fs::create_directory(target / "inside");
    REQUIRE_THROWS_AS(v2.write(target.string()), promoe::error);
    REQUIRE_THROWS_WITH(v2.write(target.string()),
                        Contains(target.string()) && Contains("cannot move the temporary file"));
    CHECK(fs::is_directory(target / "inside"));
    CHECK_FALSE(has_temp_file(dir));
    CHECK(safetensors_file::read(path).metadata().at("version") == "1");
  }
  SECTION("a target in a folder that does not exist") {
    const std::string nowhere = (dir.path / "no" / "such" / "dir" / "m.safetensors").string();
    REQUIRE_THROWS_WITH(v2.write(nowhere), Contains(nowhere) && Contains("cannot create the temporary file"));
    CHECK_FALSE(fs::exists(dir.path / "no"));
    CHECK_FALSE(has_temp_file(dir));
  }
  SECTION("a path that names no file") {
    REQUIRE_THROWS_WITH(v2.write((dir.path / "").string()), Contains("does not name a file"));
  }
#if PROMOE_TEST_POSIX
  SECTION("a write that fails half way (file size limit): the old file survives, the temporary is removed") {
    rlimit old{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit small = old;
    small.rlim_cur = 256;  // v2 is over 4000 bytes
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    std::string message;
    try {
      v2.write(path);
    } catch (const promoe::error& e) {
      message = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    CHECK_THAT(message, Contains("writing '" + path + "' failed") && Contains("the old file is untouched"));
    const auto f = safetensors_file::read(path);
    CHECK(f.metadata().at("version") == "1");
    CHECK(f.values<float>("w", {2}) == std::vector<float>{1, 2});
    CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  }
#endif
}
