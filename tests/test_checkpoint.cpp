// SPDX-License-Identifier: Apache-2.0
/// \file test_checkpoint.cpp
/// \brief promoe::io checkpoints: bit-exact round trips of several groups (odd, 0-dim and
/// empty shapes, random bit patterns NaNs included) in float and double, metadata round trip
/// (uint64 extremes), a whole DiT; every failing load (truncated files, flipped header bytes,
/// another config, missing / unexpected tensors, wrong shapes and dtypes, foreign files) is a
/// promoe::error that leaves the destinations untouched; atomic saves (a write that fails half
/// way, a process killed with SIGKILL in the middle of a 200 MB save) keep the previous file.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <csignal>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#define PROMOE_TEST_POSIX 1
#else
#define PROMOE_TEST_POSIX 0
#endif

#include <catch2/catch.hpp>

#include <promoe/backend/cpu.hpp>
#include <promoe/dit/model.hpp>
#include <promoe/io/checkpoint.hpp>

#include "temp_dir.hpp"

using Catch::Contains;
using namespace promoe;
namespace fs = std::filesystem;
using cpu = backend::cpu;

namespace {

using bytes_t = std::vector<unsigned char>;

/// The bytes of a list of tensors; printed by Catch as a short summary.
struct snapshot_t {
  std::vector<bytes_t> v;
  bool operator==(const snapshot_t&) const = default;
};

using promoe_test::temp_dir;

bytes_t read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes_t(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const bytes_t& b, std::size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(n));
}

std::uint64_t splitmix64(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// One tensor of a test state: its group, name and shape.
struct spec {
  std::string group, name;
  std::vector<index_t> shape;
};

/// Model, EMA and AdamW-like optimizer tensors with odd shapes: 0-dim, a zero dimension,
/// rank 4 with unit dimensions.
std::vector<spec> training_specs() {
  const std::vector<std::pair<std::string, std::vector<index_t>>> params{
      {"blocks.0.attn.qkv.weight", {3, 5}},
      {"blocks.0.attn.qkv.bias", {7}},
      {"scale", {}},
      {"empty", {2, 0, 3}},
      {"blocks.1.mlp.experts.0.fc1.weight", {1, 1, 1, 13}}};
  std::vector<spec> s;
  for (const auto& [n, shape] : params) {
    s.push_back({"model", n, shape});
    s.push_back({"ema", n, shape});
    s.push_back({"optim", "exp_avg." + n, shape});
    s.push_back({"optim", "exp_avg_sq." + n, shape});
  }
  s.push_back({"model", "pos_embed", {1, 4, 8}});  // a buffer (grad null)
  return s;
}

/// Tensors in cpu memory laid out by specs, and the groups that point at them.
template <class T>
struct state {
  std::vector<std::string> group_names;
  std::vector<spec> specs;
  std::vector<tensor<T, cpu>> tensors;

  explicit state(std::vector<spec> s, std::vector<std::string> groups = {"model", "ema", "optim", "aux"})
      : group_names(std::move(groups)), specs(std::move(s)) {
    for (const auto& sp : specs) tensors.emplace_back(sp.shape);
  }

  std::vector<io::checkpoint_group<T, cpu>> groups() {
    std::vector<io::checkpoint_group<T, cpu>> out;
    for (const auto& g : group_names) {
      io::checkpoint_group<T, cpu> group{g, {}};
      for (std::size_t i = 0; i < specs.size(); ++i)
        if (specs[i].group == g) group.tensors.push_back({specs[i].name, specs[i].shape, tensors[i].data(), nullptr});
      out.push_back(std::move(group));
    }
    return out;
  }

  /// Random bit patterns: NaNs with payloads (signalling too), infinities, subnormals, -0.
  void randomise(std::uint64_t seed) {
    for (auto& t : tensors)
      for (index_t i = 0; i < t.size(); ++i) {
        const std::uint64_t r = splitmix64(seed);
        std::memcpy(t.data() + i, &r, sizeof(T));
      }
  }
  void sentinel() {
    for (auto& t : tensors)
      if (t.size()) std::memset(t.data(), 0xA5, sizeof(T) * static_cast<std::size_t>(t.size()));
  }
  snapshot_t snapshot() const {
    snapshot_t out;
    for (const auto& t : tensors) {
      bytes_t b(sizeof(T) * static_cast<std::size_t>(t.size()));
      if (!b.empty()) std::memcpy(b.data(), t.data(), b.size());
      out.v.push_back(std::move(b));
    }
    return out;
  }
};

const std::string config_text =
    R"({"model": "promoe-dit", "hidden_size": 128, "depth": 2, "mlp_ratio": 4.0,
  "moe": {"num_experts": 8, "top_k": 2}, "betas": [0.9, 0.999], "name": "caf\u00e9 \u2713",
  "seed": 18446744073709551615, "learn_sigma": true, "note": null})";

io::checkpoint_info sample_info() {
  io::checkpoint_info info;
  info.step = 12345;
  info.rng_seed = std::numeric_limits<std::uint64_t>::max();
  info.rng_streams = std::numeric_limits<std::uint64_t>::max() - 1;
  info.config = config_text;
  info.extra["optim_step"] = "12345";
  info.extra["data_cursor"] = "epoch=3;offset=18446744073709551615";
  info.extra["note"] = "multi\nline \"quoted\" \xE2\x9C\x93";
  return info;
}

/// Rewrites a checkpoint through safetensors_writer with metadata changes (an empty value
/// removes the key) and optionally an extra tensor.
void rewrite(const std::string& from, const std::string& to, const std::map<std::string, std::string>& changes,
             const std::string& extra_tensor = "") {
  const auto f = io::safetensors_file::read(from);
  io::safetensors_writer w;
  for (const auto& n : f.names()) {
    const auto& e = f.at(n);
    w.add(n, e.type, e.shape, f.data(n).data());
  }
  if (!extra_tensor.empty()) {
    const auto& e = f.at(f.names().front());
    w.add(extra_tensor, e.type, e.shape, f.data(f.names().front()).data());
  }
  auto md = f.metadata();
  for (const auto& [k, v] : changes) {
    if (v.empty()) md.erase(k);
    else md[k] = v;
  }
  for (const auto& [k, v] : md) w.set_metadata(k, v);
  w.write(to);
}

}  // namespace

namespace Catch {
template <>
struct StringMaker<snapshot_t> {
  static std::string convert(const snapshot_t& s) {
    std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
    std::size_t n = 0;
    for (const auto& b : s.v)
      for (const unsigned char c : b) {
        h = (h ^ c) * 0x100000001b3ull;
        ++n;
      }
    return "<" + std::to_string(s.v.size()) + " tensors, " + std::to_string(n) + " bytes, FNV-1a " +
           std::to_string(h) + ">";
  }
};
template <>
struct StringMaker<bytes_t> {
  static std::string convert(const bytes_t& b) { return StringMaker<snapshot_t>::convert(snapshot_t{{b}}); }
};
}  // namespace Catch

TEMPLATE_TEST_CASE("checkpoint: bit-exact round trip of groups and metadata", "[checkpoint]", float, double) {
  using T = TestType;
  temp_dir dir("roundtrip");
  const std::string path = dir.file("ck.safetensors");
  state<T> src(training_specs());
  src.randomise(sizeof(T));
  const auto saved = src.snapshot();
  const io::checkpoint_info info = sample_info();
  io::save_checkpoint(path, src.groups(), info);
  CHECK(dir.entries() == std::vector<std::string>{"ck.safetensors"});

  SECTION("a plain safetensors file with '<group>/<name>' tensors in T's dtype and the metadata") {
    const auto f = io::safetensors_file::read(path);
    const std::string dt = std::is_same_v<T, double> ? "F64" : "F32";
    CHECK(f.names().size() == src.specs.size());
    for (std::size_t i = 0; i < src.specs.size(); ++i) {
      const std::string n = src.specs[i].group + "/" + src.specs[i].name;
      REQUIRE(f.contains(n));
      CHECK(std::string(io::dtype_name(f.at(n).type)) == dt);
      CHECK(f.at(n).shape == std::vector<std::int64_t>(src.specs[i].shape.begin(), src.specs[i].shape.end()));
      const auto d = f.data(n);
      CHECK(bytes_t(reinterpret_cast<const unsigned char*>(d.data()),
                    reinterpret_cast<const unsigned char*>(d.data()) + d.size()) == saved.v[i]);
    }
    CHECK(f.contains("model/scale"));
    CHECK(f.at("model/scale").shape.empty());
    const auto& md = f.metadata();
    CHECK(md.at("format") == "promoe-checkpoint");
    CHECK(md.at("version") == "1");
    CHECK(md.at("dtype") == dt);
    CHECK(md.at("groups") == "model,ema,optim,aux");
    CHECK(md.at("step") == "12345");
    CHECK(md.at("rng_seed") == "18446744073709551615");
    CHECK(md.at("rng_streams") == "18446744073709551614");
    CHECK(md.at("config") == config_text);
    CHECK(md.at("optim_step") == "12345");
  }

  SECTION("load restores every tensor bit for bit and returns the info") {
    state<T> dst(training_specs());
    dst.sentinel();
    const auto got = io::load_checkpoint(path, dst.groups(), config_text);
    CHECK(dst.snapshot() == saved);
    CHECK(got.step == info.step);
    CHECK(got.rng_seed == std::numeric_limits<std::uint64_t>::max());
    CHECK(got.rng_streams == std::numeric_limits<std::uint64_t>::max() - 1);
    CHECK(got.config == config_text);
    CHECK(got.extra == info.extra);
    CHECK(got.dtype == (std::is_same_v<T, double> ? "F64" : "F32"));
    CHECK(got.groups == std::vector<std::string>{"model", "ema", "optim", "aux"});
    const rng r = got.make_rng();
    CHECK(r.seed() == info.rng_seed);
    CHECK(r.streams_used() == info.rng_streams);
  }

  SECTION("read_checkpoint_info gives the same info without the tensor data") {
    const auto got = io::read_checkpoint_info(path);
    CHECK(got.step == info.step);
    CHECK(got.rng_seed == info.rng_seed);
    CHECK(got.rng_streams == info.rng_streams);
    CHECK(got.config == info.config);
    CHECK(got.extra == info.extra);
    CHECK(got.groups == std::vector<std::string>{"model", "ema", "optim", "aux"});
  }

  SECTION("a subset of groups loads alone; the others are ignored") {
    state<T> dst(training_specs(), {"ema"});
    dst.sentinel();
    io::load_checkpoint(path, dst.groups(), config_text);
    const auto got = dst.snapshot();
    const auto untouched = [&] {
      state<T> s(training_specs());
      s.sentinel();
      return s.snapshot();
    }();
    for (std::size_t i = 0; i < src.specs.size(); ++i) {
      INFO(src.specs[i].group << "/" << src.specs[i].name);
      CHECK(got.v[i] == (src.specs[i].group == "ema" ? saved.v[i] : untouched.v[i]));
    }
  }

  SECTION("EMA weights load into a model's own tensors (group names are independent of the destinations)") {
    state<T> model_only(training_specs(), {"model"});
    model_only.sentinel();
    auto g = model_only.groups();
    g[0].name = "ema";
    std::erase_if(g[0].tensors, [](const auto& p) { return p.name == "pos_embed"; });  // EMA has no buffers here
    io::load_checkpoint(path, g, config_text);
    const auto got = model_only.snapshot();
    for (std::size_t i = 0; i < src.specs.size(); ++i)
      if (src.specs[i].group == "model" && src.specs[i].name != "pos_embed") {
        const auto ema = std::find_if(src.specs.begin(), src.specs.end(),
                                      [&](const spec& s) { return s.group == "ema" && s.name == src.specs[i].name; });
        CHECK(got.v[i] == saved.v[static_cast<std::size_t>(ema - src.specs.begin())]);
      }
  }

  SECTION("the same config written differently (order, spaces, escapes, 4 vs 4.0) loads") {
    const std::string same =
        "{\"note\":null,\"learn_sigma\":true,\"seed\":18446744073709551615,\"name\":\"caf\xC3\xA9 \xE2\x9C\x93\","
        "\"betas\":[9e-1,0.999],\"moe\":{\"top_k\":2,\"num_experts\":8},\"mlp_ratio\":4,\"depth\":2,"
        "\"hidden_size\":128,\"model\":\"promoe-dit\"}";
    state<T> dst(training_specs());
    io::load_checkpoint(path, dst.groups(), same);
    CHECK(dst.snapshot() == saved);
  }

  SECTION("saving again overwrites and leaves only the file") {
    state<T> v2(training_specs());
    v2.randomise(99);
    auto info2 = info;
    info2.step = 0;
    info2.rng_seed = 0;
    info2.rng_streams = 0;
    info2.extra.clear();
    io::save_checkpoint(path, v2.groups(), info2);
    CHECK(dir.entries() == std::vector<std::string>{"ck.safetensors"});
    state<T> dst(training_specs());
    const auto got = io::load_checkpoint(path, dst.groups(), config_text);
    CHECK(dst.snapshot() == v2.snapshot());
    CHECK(got.step == 0);
    CHECK(got.rng_seed == 0);
    CHECK(got.extra.empty());
  }
}

TEMPLATE_TEST_CASE("checkpoint: a whole DiT (parameters and buffers) round trips", "[checkpoint][dit]", float, double) {
  using T = TestType;
  dit::dit_config cfg;
  cfg.input_size = 4;
  cfg.patch_size = 2;
  cfg.in_channels = 2;
  cfg.hidden_size = 8;
  cfg.depth = 2;
  cfg.num_heads = 2;
  cfg.mlp_ratio = 2;
  cfg.num_classes = 3;
  const std::string config = R"({"input_size": 4, "patch_size": 2, "in_channels": 2, "hidden_size": 8})";
  using model_t = dit::dit_model<cpu, T>;
  const auto all = [](model_t& m) {
    auto v = m.parameters();
    for (auto& b : m.buffers()) v.push_back(b);
    return v;
  };
  const auto bits = [&](model_t& m) {
    std::vector<bytes_t> out;
    for (const auto& p : all(m)) {
      bytes_t b(sizeof(T) * static_cast<std::size_t>(p.size()));
      if (!b.empty()) std::memcpy(b.data(), p.value, b.size());
      out.push_back(std::move(b));
    }
    return out;
  };
  model_t a(cfg, {}, rng{1});
  std::uint64_t s = 7;
  for (auto& p : a.parameters())
    for (index_t i = 0; i < p.size(); ++i) p.value[i] = static_cast<T>(static_cast<double>(splitmix64(s) >> 11) * 0x1p-53 - 0.5);
  temp_dir dir("dit");
  const std::string path = dir.file("dit.safetensors");
  io::checkpoint_info info;
  info.step = 3;
  info.config = config;
  io::save_checkpoint<T, cpu>(path, {{"model", all(a)}}, info);

  model_t b(cfg, {}, rng{2});
  REQUIRE(bits(a) != bits(b));
  io::load_checkpoint<T, cpu>(path, {{"model", all(b)}}, config);
  CHECK(bits(a) == bits(b));
  CHECK_THROWS_WITH((io::load_checkpoint<T, cpu>(path, {{"model", all(b)}}, R"({"input_size": 4, "patch_size": 2,
      "in_channels": 2, "hidden_size": 16})")),
                    Contains("config differs at 'hidden_size' (file: 8, expected: 16)"));
}

TEST_CASE("checkpoint: every failing load is a promoe::error and leaves the destinations untouched",
          "[checkpoint][errors]") {
  using T = float;
  temp_dir dir("errors");
  const std::string path = dir.file("ck.safetensors");
  const std::string bad = dir.file("bad.safetensors");
  state<T> src(training_specs());
  src.randomise(5);
  io::save_checkpoint(path, src.groups(), sample_info());

  state<T> dst(training_specs());
  dst.sentinel();
  const auto sentinel = dst.snapshot();
  const auto load = [&](const std::string& p, const std::string& config = config_text) {
    return io::load_checkpoint(p, dst.groups(), config);
  };
  // Checks the load throws a promoe::error containing `what`, and the destinations are unchanged.
  const auto fails_with = [&](const std::string& p, const std::string& what, const std::string& config = config_text) {
    std::string message;
    try {
      load(p, config);
    } catch (const promoe::error& e) {
      message = e.what();
    }
    INFO("message: " << message);
    CHECK_THAT(message, Contains(what));
    CHECK(dst.snapshot() == sentinel);
    return message;
  };

  SECTION("a file cut at any length") {
    const bytes_t whole = read_bytes(path);
    std::size_t errors = 0;
    for (std::size_t n = 0; n < whole.size(); ++n) {
      write_bytes(bad, whole, n);
      bool threw = false;
      try {
        load(bad);
      } catch (const promoe::error&) {
        threw = true;
      }
      bool info_threw = false;
      try {
        io::read_checkpoint_info(bad);
      } catch (const promoe::error&) {
        info_threw = true;
      }
      if (threw && info_threw) ++errors;
      else FAIL_CHECK("a file cut at " << n << " of " << whole.size() << " bytes did not fail");
    }
    CHECK(errors == whole.size());
    CHECK(dst.snapshot() == sentinel);
    fails_with(dir.file("missing.safetensors"), "cannot open");
  }

  SECTION("a flipped byte in the header: an error, or (metadata values only) a correct load") {
    const bytes_t whole = read_bytes(path);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | whole[static_cast<std::size_t>(i)];
    std::size_t errors = 0, loads = 0;
    const auto saved = src.snapshot();
    for (std::size_t at = 8; at < 8 + n; ++at) {
      bytes_t flipped = whole;
      flipped[at] ^= 0x01;
      write_bytes(bad, flipped, flipped.size());
      try {
        load(bad);
        ++loads;
        CHECK(dst.snapshot() == saved);  // what still loads has the right values
        dst.sentinel();
      } catch (const promoe::error&) {
        ++errors;
        if (dst.snapshot() != sentinel) FAIL_CHECK("byte " << at << " flipped: a failed load wrote destinations");
      }
    }
    CHECK(errors > 8 * loads);
    bytes_t brace = whole;
    brace[8] = '[';
    write_bytes(bad, brace, brace.size());
    fails_with(bad, "must be a JSON object");
  }

  SECTION("another config names the first differing key and both values") {
    std::string other = config_text;
    other.replace(other.find("128"), 3, "192");
    fails_with(path, "ck.safetensors: config differs at 'hidden_size' (file: 128, expected: 192)", other);
    other = config_text;
    other.replace(other.find("\"top_k\": 2"), 10, "\"top_k\": 1");
    fails_with(path, "config differs at 'moe.top_k' (file: 2, expected: 1)", other);
    other = config_text;
    other.replace(other.find("0.999"), 5, "0.99");
    fails_with(path, "config differs at 'betas[1]' (file: 0.999, expected: 0.99)", other);
    other = config_text;
    other.replace(other.find("18446744073709551615"), 20, "18446744073709551614");
    fails_with(path, "config differs at 'seed' (file: 18446744073709551615, expected: 18446744073709551614)", other);
    other = config_text;
    other.replace(other.find("\"depth\": 2, "), 12, "");
    fails_with(path, "config differs at 'depth' (file: 2, expected: <missing>)", other);
    other = config_text;
    other.insert(1, "\"patch_size\": 2, ");
    fails_with(path, "config differs at 'patch_size' (file: <missing>, expected: 2)", other);
    fails_with(path, "config differs from the expected config (compared as text because the expected config is not",
               "hidden_size=128");
  }

  SECTION("a missing tensor, an unexpected tensor, a wrong shape, a missing group") {
    state<T> more(training_specs());
    more.specs.push_back({"optim", "exp_avg.extra", {2}});
    more.tensors.emplace_back(std::vector<index_t>{2});
    more.sentinel();
    const auto more_sentinel = more.snapshot();
    std::string message;
    try {
      io::load_checkpoint(path, more.groups(), config_text);
    } catch (const promoe::error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("tensor 'optim/exp_avg.extra' is missing from the checkpoint"));
    CHECK(more.snapshot() == more_sentinel);

    state<T> fewer(training_specs());
    fewer.specs.erase(fewer.specs.begin() + 2);  // optim/exp_avg.blocks.0.attn.qkv.weight
    fewer.tensors.erase(fewer.tensors.begin() + 2);
    fewer.sentinel();
    const auto fewer_sentinel = fewer.snapshot();
    message.clear();
    try {
      io::load_checkpoint(path, fewer.groups(), config_text);
    } catch (const promoe::error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("tensor 'optim/exp_avg.blocks.0.attn.qkv.weight' is not expected in group 'optim'"));
    CHECK(fewer.snapshot() == fewer_sentinel);

    state<T> reshaped(training_specs());
    reshaped.specs.back().shape = {1, 8, 4};  // model/pos_embed, same size
    reshaped.sentinel();
    const auto reshaped_sentinel = reshaped.snapshot();
    message.clear();
    try {
      io::load_checkpoint(path, reshaped.groups(), config_text);
    } catch (const promoe::error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("tensor 'model/pos_embed' has shape [1, 4, 8] in the checkpoint, expected [1, 8, 4]"));
    CHECK(reshaped.snapshot() == reshaped_sentinel);

    state<T> scalar(training_specs());
    scalar.specs[8].shape = {1};  // model/scale is 0-dim in the file
    scalar.tensors[8].resize({1});
    scalar.sentinel();
    const auto scalar_sentinel = scalar.snapshot();
    REQUIRE(scalar.specs[8].name == "scale");
    CHECK_THROWS_WITH(io::load_checkpoint(path, scalar.groups(), config_text),
                      Contains("tensor 'model/scale' has shape [] in the checkpoint, expected [1]"));
    CHECK(scalar.snapshot() == scalar_sentinel);

    state<T> extra_group(training_specs(), {"model", "ema", "optim", "aux", "ema2"});
    extra_group.sentinel();
    const auto extra_sentinel = extra_group.snapshot();
    CHECK_THROWS_WITH(io::load_checkpoint(path, extra_group.groups(), config_text),
                      Contains("the checkpoint has no group 'ema2' (it has 'model', 'ema', 'optim', 'aux')"));
    CHECK(extra_group.snapshot() == extra_sentinel);
  }

  SECTION("an unexpected tensor in a loaded group of the file") {
    rewrite(path, bad, {}, "model/zzz.unexpected");
    fails_with(bad, "tensor 'model/zzz.unexpected' is not expected in group 'model' (1 unexpected tensor in the group)");
  }

  SECTION("wrong dtype: saved from double, loaded as float") {
    state<double> d(training_specs());
    d.randomise(3);
    io::save_checkpoint(bad, d.groups(), sample_info());
    fails_with(bad, "checkpoint holds F64 tensors (saved from double), but this load reads F32 (float)");
    state<double> back(training_specs());
    io::load_checkpoint(bad, back.groups(), config_text);
    CHECK(back.snapshot() == d.snapshot());
  }

  SECTION("foreign files and bad metadata") {
    io::safetensors_writer plain;
    plain.add("w", {2}, std::vector<float>{1, 2});
    plain.write(bad);
    fails_with(bad, "not a promoe checkpoint: no \"format\" metadata (a plain safetensors file?)");
    CHECK_THROWS_WITH(io::read_checkpoint_info(bad), Contains("not a promoe checkpoint"));
    plain.set_metadata("format", "pt");
    plain.write(bad);
    fails_with(bad, "not a promoe checkpoint: format is 'pt', expected 'promoe-checkpoint'");

    rewrite(path, bad, {{"format", "promoe-checkpoint-x"}});
    fails_with(bad, "format is 'promoe-checkpoint-x'");
    rewrite(path, bad, {{"version", "2"}});
    fails_with(bad, "checkpoint version '2' is not supported (this build reads version 1)");
    rewrite(path, bad, {{"version", ""}});
    fails_with(bad, "checkpoint metadata has no \"version\" entry");
    rewrite(path, bad, {{"step", "12a"}});
    fails_with(bad, "\"step\" is '12a', expected a decimal integer");
    rewrite(path, bad, {{"rng_streams", "18446744073709551616"}});
    fails_with(bad, "\"rng_streams\" is '18446744073709551616'");
    rewrite(path, bad, {{"rng_seed", "-1"}});
    fails_with(bad, "\"rng_seed\" is '-1'");
    rewrite(path, bad, {{"config", ""}});
    fails_with(bad, "no \"config\" entry");
    rewrite(path, bad, {{"dtype", "F64"}});
    fails_with(bad, "has dtype F32, but the checkpoint's dtype is F64");
    rewrite(path, bad, {{"dtype", "I64"}});
    fails_with(bad, "\"dtype\" is 'I64', expected 'F32' or 'F64'");
    rewrite(path, bad, {{"groups", "model,ema,aux"}});
    fails_with(bad, "belongs to no group of the checkpoint");
    rewrite(path, bad, {{"groups", "model,ema,optim,aux,model"}});
    fails_with(bad, "group names must be distinct");
    rewrite(path, bad, {}, "stray");
    fails_with(bad, "tensor 'stray' belongs to no group");
    CHECK_THROWS_AS(io::read_checkpoint_info(bad), promoe::error);
  }

  SECTION("a directory is not a checkpoint") {
    fs::create_directory(dir.path / "d");
    fails_with(dir.file("d"), "is a directory");
    CHECK_THROWS_WITH(io::read_checkpoint_info(dir.file("d")), Contains("is a directory"));
  }

  SECTION("bad destination lists are rejected before reading") {
    auto g = dst.groups();
    g.push_back(g[0]);
    CHECK_THROWS_WITH(io::load_checkpoint(path, g, config_text), Contains("group 'model' appears twice"));
    g = dst.groups();
    g[1].tensors.push_back(g[1].tensors[0]);
    CHECK_THROWS_WITH(io::load_checkpoint(path, g, config_text),
                      Contains("tensor 'blocks.0.attn.qkv.weight' appears twice in group 'ema'"));
    g = dst.groups();
    g[0].tensors[0].value = nullptr;
    CHECK_THROWS_WITH(io::load_checkpoint(path, g, config_text), Contains("has a null value pointer"));
    CHECK(dst.snapshot() == sentinel);
  }
}

TEST_CASE("checkpoint: config comparison", "[checkpoint][config]") {
  using io::detail::check_checkpoint_config;
  const std::string f = "f.safetensors";
  CHECK_NOTHROW(check_checkpoint_config("{}", " { } ", f));
  CHECK_NOTHROW(check_checkpoint_config(R"({"a":1,"b":{"c":[1,2.5e0]}})", R"({"b":{"c":[1.0,2.5]},"a":1e0})", f));
  CHECK_NOTHROW(check_checkpoint_config(R"({"a":"\u00e9\ud83d\ude00"})", "{\"a\":\"\xC3\xA9\xF0\x9F\x98\x80\"}", f));
  CHECK_NOTHROW(check_checkpoint_config("not json", "not json", f));
  CHECK_THROWS_WITH(check_checkpoint_config(R"({"a":1})", R"({"a":"1"})", f),
                    Contains("config differs at 'a' (file: 1, expected: \"1\")"));
  CHECK_THROWS_WITH(check_checkpoint_config(R"({"a":[1,2]})", R"({"a":[1,2,3]})", f),
                    Contains("config differs at 'a' (file: [1,2], expected: [1,2,3])"));
  CHECK_THROWS_WITH(check_checkpoint_config(R"({"a":{"b":true}})", R"({"a":{"b":false}})", f),
                    Contains("config differs at 'a.b' (file: true, expected: false)"));
  CHECK_THROWS_WITH(check_checkpoint_config("[1]", "[2]", f),
                    Contains("f.safetensors: config differs at '[0]' (file: 1, expected: 2)"));
  CHECK_THROWS_WITH(check_checkpoint_config("1", R"({"a":1})", f),
                    Contains("f.safetensors: config differs (file: 1, expected: {\"a\":1})"));
  CHECK_THROWS_WITH(check_checkpoint_config(R"({"a":1,"a":1})", R"({"a":1})", f),
                    Contains("the file's config is not valid JSON"));
  CHECK_THROWS_WITH(check_checkpoint_config("abc", "abd", f),
                    Contains("neither is valid JSON; first difference at byte 2: file \"abc\", expected \"abd\""));
  std::string deep(100, '[');
  deep += std::string(100, ']');
  CHECK_THROWS_WITH(check_checkpoint_config(deep, "[]", f), Contains("not valid JSON"));
}

TEST_CASE("checkpoint: bad saves throw before writing; the previous file stays", "[checkpoint][errors][write]") {
  using T = double;
  temp_dir dir("badsave");
  const std::string path = dir.file("ck.safetensors");
  state<T> v1(training_specs());
  v1.randomise(1);
  io::save_checkpoint(path, v1.groups(), sample_info());
  const bytes_t before = read_bytes(path);

  state<T> v2(training_specs());
  v2.randomise(2);
  auto g = v2.groups();
  auto info = sample_info();
  SECTION("duplicate group") {
    g.push_back(g[0]);
    CHECK_THROWS_WITH(io::save_checkpoint(path, g, info), Contains("save_checkpoint: group 'model' appears twice"));
  }
  SECTION("group names with '/' or ',' or empty") {
    g[0].name = "mo/del";
    CHECK_THROWS_WITH(io::save_checkpoint(path, g, info), Contains("group name 'mo/del'"));
    g[0].name = "a,b";
    CHECK_THROWS_AS(io::save_checkpoint(path, g, info), promoe::error);
    g[0].name = "";
    CHECK_THROWS_AS(io::save_checkpoint(path, g, info), promoe::error);
  }
  SECTION("duplicate tensor, null pointer, reserved extra key, invalid UTF-8") {
    auto dup = g;
    dup[2].tensors.push_back(dup[2].tensors[1]);
    CHECK_THROWS_WITH(io::save_checkpoint(path, dup, info), Contains("appears twice in group 'optim'"));
    auto null = g;
    null[1].tensors[1].value = nullptr;
    CHECK_THROWS_WITH(io::save_checkpoint(path, null, info),
                      Contains("tensor 'ema/blocks.0.attn.qkv.bias' has a null value pointer"));
    auto reserved = info;
    reserved.extra["step"] = "1";
    CHECK_THROWS_WITH(io::save_checkpoint(path, g, reserved), Contains("extra metadata key 'step' is reserved"));
    auto utf8 = info;
    utf8.config = "\xff";
    CHECK_THROWS_WITH(io::save_checkpoint(path, g, utf8), Contains("not valid UTF-8"));
  }
  CHECK(read_bytes(path) == before);
  CHECK(dir.entries() == std::vector<std::string>{"ck.safetensors"});
}

#if PROMOE_TEST_POSIX
TEST_CASE("checkpoint: a save that fails half way keeps the previous checkpoint", "[checkpoint][write]") {
  using T = float;
  temp_dir dir("atomic");
  const std::string path = dir.file("ck.safetensors");
  state<T> v1(training_specs());
  v1.randomise(11);
  io::save_checkpoint(path, v1.groups(), sample_info());

  std::vector<spec> big = training_specs();
  big.push_back({"model", "big", {64, 1024}});  // 256 KiB
  state<T> v2(big);
  v2.randomise(12);
  auto info2 = sample_info();
  info2.step = 99;

  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 64 * 1024;  // the write stops in the middle of the tensor data
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string message;
  try {
    io::save_checkpoint(path, v2.groups(), info2);
  } catch (const promoe::error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  CHECK_THAT(message, Contains("writing '" + path + "' failed") && Contains("the old file is untouched"));

  CHECK(dir.entries() == std::vector<std::string>{"ck.safetensors"});  // the temporary file was removed
  state<T> dst(training_specs());
  dst.sentinel();
  const auto got = io::load_checkpoint(path, dst.groups(), config_text);
  CHECK(got.step == 12345);
  CHECK(dst.snapshot() == v1.snapshot());
}

TEST_CASE("checkpoint: a process killed in the middle of a 200 MB save keeps the previous checkpoint",
          "[checkpoint][write][kill]") {
  using T = double;
  using clock = std::chrono::steady_clock;
  temp_dir dir("kill");
  const std::string name = "ck.safetensors";
  const std::string path = dir.file(name);
  std::vector<spec> model_ema = training_specs();
  std::erase_if(model_ema, [](const spec& s) { return s.group == "optim"; });
  state<T> v1(model_ema, {"model", "ema"});
  v1.randomise(21);
  auto info1 = sample_info();
  info1.step = 1;
  io::save_checkpoint(path, v1.groups(), info1);
  const bytes_t v1_bytes = read_bytes(path);

  // v2: the same groups plus 200 MB of float64.
  std::vector<spec> specs = model_ema;
  specs.push_back({"big", "x", {25'000'000}});
  state<T> v2(specs, {"model", "ema", "big"});
  std::fill(v2.tensors.back().data(), v2.tensors.back().data() + v2.tensors.back().size(), 1.5);
  auto info2 = sample_info();
  info2.step = 2;

  const auto t0 = clock::now();
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    try {
      io::save_checkpoint(path, v2.groups(), info2);
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(0);
  }
  // Wait for the child's temporary file to hold at least 1 MB, then SIGKILL it.
  const std::string temp_prefix = name + ".tmp." + std::to_string(child) + ".";
  std::string temp;
  std::uintmax_t temp_size = 0;
  bool exited_early = false;
  while (clock::now() - t0 < std::chrono::seconds(20)) {
    int status = 0;
    if (::waitpid(child, &status, WNOHANG) == child) {
      exited_early = true;
      break;
    }
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir.path, ec)) {
      const std::string n = e.path().filename().string();
      if (n.rfind(temp_prefix, 0) == 0) temp = n;
    }
    if (!temp.empty()) {
      temp_size = fs::file_size(dir.path / temp, ec);
      if (!ec && temp_size >= (1u << 20)) break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  REQUIRE_FALSE(exited_early);
  ::kill(child, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  INFO("temporary file '" << temp << "' had " << temp_size << " bytes when the child was killed");
  REQUIRE_FALSE(temp.empty());
  CHECK(temp_size < 200'000'000u);

  // The previous checkpoint is intact; the only other entry is the stale temporary file.
  CHECK(read_bytes(path) == v1_bytes);
  state<T> dst(model_ema, {"model", "ema"});
  dst.sentinel();
  const auto got = io::load_checkpoint(path, dst.groups(), config_text);
  CHECK(got.step == 1);
  CHECK(dst.snapshot() == v1.snapshot());
  CHECK(dir.entries() == std::vector<std::string>{name, temp});

  // The next save removes it (its writer is gone).
  info1.step = 3;
  io::save_checkpoint(path, v1.groups(), info1);
  CHECK(dir.entries() == std::vector<std::string>{name});
  CHECK(io::read_checkpoint_info(path).step == 3);
  CHECK(clock::now() - t0 < std::chrono::seconds(10));
}

TEST_CASE("checkpoint: remove_stale_temp_files removes only dead writers' temporary files of that path",
          "[checkpoint][write]") {
  temp_dir dir("stale");
  const pid_t dead = ::fork();
  REQUIRE(dead >= 0);
  if (dead == 0) ::_exit(0);
  int status = 0;
  REQUIRE(::waitpid(dead, &status, 0) == dead);
  const std::string d = std::to_string(dead);
  const std::vector<std::string> names{"ck.safetensors",
                                       "ck.safetensors.tmp." + d + ".0",                    // dead: removed
                                       "ck.safetensors.tmp." + d + ".17",                   // dead: removed
                                       "ck.safetensors.tmp." + std::to_string(::getpid()) + ".3",  // this process
                                       "ck.safetensors.tmp.1.0",                            // pid 1 runs
                                       "ck.safetensors.tmp." + d,                           // not the pattern
                                       "ck.safetensors.tmp." + d + ".x",
                                       "other.safetensors.tmp." + d + ".0"};               // another target
  for (const auto& n : names) std::ofstream(dir.path / n) << "x";
  CHECK(io::remove_stale_temp_files(dir.file("ck.safetensors")) == 2);
  auto left = names;
  left.erase(left.begin() + 1, left.begin() + 3);
  std::sort(left.begin(), left.end());
  CHECK(dir.entries() == left);
  CHECK(io::remove_stale_temp_files(dir.file("ck.safetensors")) == 0);
  CHECK(io::remove_stale_temp_files(dir.file("nothing-here/ck.safetensors")) == 0);
}
#endif
