// SPDX-License-Identifier: Apache-2.0
/// \file images.hpp
/// \brief eval::image_set: images to evaluate as float rows in [-1, 1] with their labels,
/// read from a samples .npz (what sample_dit and the ADM evaluator use: "arr_0" uint8
/// [N, H, W, C], optional "labels" int64 [N]) or taken from an io::labelled_images set.
///
/// A byte v becomes v / 127.5 - 1 (train_dit's scaling); image n is row n of `pixels`
/// ([N, H * W * C], channels last, as stored). The expected image shape is checked: a file
/// with other images is a promoe::error naming the file, its shape and the expected one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "../io/idx.hpp"
#include "../io/npz.hpp"

namespace promoe::eval {

/// The shape of one image: height, width, channels (channels last).
struct image_shape {
  index_t height = 28, width = 28, channels = 1;
  index_t size() const { return height * width * channels; }
  bool operator==(const image_shape&) const = default;
};

/// N images as float rows in [-1, 1] and their labels (empty when the source has none).
struct image_set {
  index_t n = 0;
  image_shape shape;
  std::vector<float> pixels;          ///< [n, shape.size()]
  std::vector<std::int64_t> labels;   ///< [n] or empty

  const_matrix_view<float> matrix() const { return {pixels.data(), n, shape.size()}; }
  bool has_labels() const { return !labels.empty(); }
};

/// Bytes [n, H, W, C] -> floats in [-1, 1].
inline std::vector<float> bytes_to_unit_range(std::span<const std::uint8_t> bytes) {
  std::vector<float> out(bytes.size());
  for (std::size_t i = 0; i < bytes.size(); ++i) out[i] = static_cast<float>(bytes[i]) / 127.5f - 1.0f;
  return out;
}

/// Checks labels against [0, num_classes) (num_classes <= 0: no check); `what` names the source.
inline void check_labels(const std::vector<std::int64_t>& labels, index_t num_classes, const std::string& what) {
  if (num_classes <= 0) return;
  for (std::size_t i = 0; i < labels.size(); ++i)
    PROMOE_CHECK(labels[i] >= 0 && labels[i] < num_classes, what, ": label ", labels[i], " of image ", i,
                 " is outside 0..", num_classes - 1);
}

/// Reads a samples .npz: "arr_0" uint8 [N, H, W, C] with the expected H, W, C (a 3-D
/// [N, H, W] array is accepted when C is 1) and, when present, "labels" [N] (int64 or uint8)
/// in [0, num_classes). N must be at least 1.
inline image_set read_samples_npz(const std::string& path, const image_shape& expected, index_t num_classes = 0) {
  const io::npz_file f = io::npz_file::read(path);
  const io::npy_array& a = f.at("arr_0");
  const std::string want = "[N, " + std::to_string(expected.height) + ", " + std::to_string(expected.width) + ", " +
                           std::to_string(expected.channels) + "]";
  PROMOE_CHECK(a.type == io::npy_dtype::u8, path, ": 'arr_0' has dtype '", io::npy_descr(a.type),
               "', expected uint8 ('|u1') images ", want);
  const bool nhwc = a.shape.size() == 4 && a.shape[1] == expected.height && a.shape[2] == expected.width &&
                    a.shape[3] == expected.channels;
  const bool nhw = expected.channels == 1 && a.shape.size() == 3 && a.shape[1] == expected.height &&
                   a.shape[2] == expected.width;
  PROMOE_CHECK(nhwc || nhw, path, ": 'arr_0' has shape ", ::promoe::detail::shape_string(a.shape),
               ", expected images ", want, " (uint8, channels last)");
  PROMOE_CHECK(a.shape[0] >= 1, path, ": 'arr_0' holds no images (shape ", ::promoe::detail::shape_string(a.shape),
               ")");
  image_set s;
  s.n = a.shape[0];
  s.shape = expected;
  s.pixels = bytes_to_unit_range(a.values<std::uint8_t>());
  if (f.contains("labels")) {
    const io::npy_array& l = f.at("labels");
    PROMOE_CHECK(l.shape.size() == 1 && l.shape[0] == s.n, path, ": 'labels' has shape ",
                 ::promoe::detail::shape_string(l.shape), ", expected [", s.n, "] (one label per image)");
    PROMOE_CHECK(l.type == io::npy_dtype::i64 || l.type == io::npy_dtype::u8, path, ": 'labels' has dtype '",
                 io::npy_descr(l.type), "', expected int64 ('<i8')");
    s.labels = l.values<std::int64_t>();
    check_labels(s.labels, num_classes, path + ": 'labels'");
  }
  return s;
}

/// The images [first, first + count) of a labelled set (count < 0: to the end), checked
/// against the expected shape; `what` names the set in errors.
inline image_set from_labelled_images(const io::labelled_images& set, const image_shape& expected,
                                      const std::string& what, index_t first = 0, index_t count = -1) {
  const image_shape have{set.H, set.W, set.C};
  PROMOE_CHECK(have == expected, what, ": images of shape [", set.H, ", ", set.W, ", ", set.C, "], expected [",
               expected.height, ", ", expected.width, ", ", expected.channels, "]");
  if (count < 0) count = set.N - first;
  PROMOE_CHECK(first >= 0 && count >= 0 && first + count <= set.N, what, ": images [", first, ", ", first + count,
               ") out of range [0, ", set.N, ")");
  image_set s;
  s.n = count;
  s.shape = expected;
  const auto size = static_cast<std::size_t>(expected.size());
  s.pixels = bytes_to_unit_range(std::span<const std::uint8_t>(set.pixels).subspan(
      static_cast<std::size_t>(first) * size, static_cast<std::size_t>(count) * size));
  s.labels.assign(set.labels.begin() + first, set.labels.begin() + first + count);
  return s;
}

/// The images of `set` at the given indices (in that order).
inline image_set select(const image_set& set, const std::vector<index_t>& indices) {
  image_set s;
  s.n = static_cast<index_t>(indices.size());
  s.shape = set.shape;
  const auto size = static_cast<std::size_t>(set.shape.size());
  s.pixels.resize(indices.size() * size);
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const index_t k = indices[i];
    PROMOE_CHECK(k >= 0 && k < set.n, "eval::select: index ", k, " out of range [0, ", set.n, ")");
    std::copy_n(set.pixels.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(k) * size), size,
                s.pixels.begin() + static_cast<std::ptrdiff_t>(i * size));
    if (set.has_labels()) s.labels.push_back(set.labels[static_cast<std::size_t>(k)]);
  }
  return s;
}

}  // namespace promoe::eval
