// SPDX-License-Identifier: Apache-2.0
// What train_dit trains on, from --data: a folder of IDX files (Fashion-MNIST's layout), an
// image folder (one sub-folder of PNGs per class), or a safetensors file of latents.
#pragma once

#include <filesystem>
#include <string>
#include <variant>

#include <promoe/dit/config.hpp>
#include <promoe/io/idx.hpp>
#include <promoe/io/image_folder.hpp>
#include <promoe/io/latents.hpp>

namespace app {

/// A labelled training set whose samples come out as the model's [C, H, W] input: image
/// bytes scaled to [-1, 1], latents as stored.
class training_data {
 public:
  /// Loads `path` for a model of config d and checks that the samples fit it.
  static training_data load(const std::string& path, const promoe::dit::dit_config& d) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const auto st = fs::status(path, ec);
    PROMOE_CHECK(!ec && fs::exists(st), "--data ", path, ": no such file or folder");
    training_data out;
    if (fs::is_regular_file(st)) {
      PROMOE_CHECK(fs::path(path).extension() == ".safetensors", "--data ", path,
                   ": a file must be a .safetensors of latents (folders hold IDX files or one sub-folder per class)");
      out.set_ = promoe::io::load_latents(path);
    } else if (fs::exists(fs::path(path) / "train-images-idx3-ubyte.gz") ||
               fs::exists(fs::path(path) / "train-images-idx3-ubyte")) {
      out.set_ = promoe::io::load_fashion_mnist(true, path);
    } else {
      PROMOE_CHECK(d.in_channels == 1 || d.in_channels == 3, "--data ", path, ": an image folder gives 1 or 3 channels, "
                   "but the preset takes ", d.in_channels, " (use latents in a .safetensors file)");
      out.set_ = promoe::io::load_image_folder(path, static_cast<int>(d.in_channels));
    }
    out.check(path, d);
    return out;
  }

  promoe::index_t size() const {
    return std::visit([](const auto& s) { return s.N; }, set_);
  }
  std::int64_t label(promoe::index_t k) const {
    return std::visit([&](const auto& s) { return s.labels[static_cast<std::size_t>(k)]; }, set_);
  }
  /// Images (shown as sample grids) rather than latents (which need a decoder to be seen).
  bool images() const { return std::holds_alternative<promoe::io::labelled_images>(set_); }

  /// Writes sample k as C * H * W values (channel-major) to out.
  template <class T>
  void fill(promoe::index_t k, T* out) const {
    if (const auto* img = std::get_if<promoe::io::labelled_images>(&set_)) {
      const auto px = img->image(k);  // [H, W, C] bytes
      const promoe::index_t hw = img->H * img->W, c = img->C;
      for (promoe::index_t ch = 0; ch < c; ++ch)
        for (promoe::index_t p = 0; p < hw; ++p) out[ch * hw + p] = static_cast<T>(px[p * c + ch]) / T(127.5) - T(1);
    } else {
      const auto v = std::get<promoe::io::labelled_latents>(set_).sample(k);
      for (std::size_t j = 0; j < v.size(); ++j) out[j] = static_cast<T>(v[j]);
    }
  }

 private:
  void check(const std::string& path, const promoe::dit::dit_config& d) const {
    std::visit(
        [&](const auto& s) {
          PROMOE_CHECK(s.N > 0, "--data ", path, ": holds no samples");
          PROMOE_CHECK(s.H == d.input_size && s.W == d.input_size && s.C == d.in_channels, "--data ", path,
                       ": samples are ", s.H, "x", s.W, "x", s.C, " (HxWxC) but the preset expects ", d.input_size,
                       "x", d.input_size, "x", d.in_channels);
          for (std::size_t i = 0; i < s.labels.size(); ++i)
            PROMOE_CHECK(s.labels[i] >= 0 && s.labels[i] < d.num_classes, "--data ", path, ": label ", s.labels[i],
                         " of sample ", i, " is outside 0..", d.num_classes - 1, " (the preset's classes)");
        },
        set_);
  }

  std::variant<promoe::io::labelled_images, promoe::io::labelled_latents> set_;
};

}  // namespace app
