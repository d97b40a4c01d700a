// SPDX-License-Identifier: Apache-2.0
/// \file image_folder.hpp
/// \brief A labelled image set from a folder with one sub-folder per class, as torchvision's
/// ImageFolder lays it out: root/<class>/.../<image>.png.
///
/// Classes are the sub-folders of root sorted by name (byte order), labelled 0..K-1; names
/// starting with '.' are skipped. Within a class, every file whose extension is ".png" (any
/// case) is read, searching sub-folders too, in path order; other files are skipped. Every PNG
/// is validated and decoded (promoe/io/png.hpp); one that fails is an error naming it. All
/// images must share one size; they are converted to the requested channel count (1: gray,
/// stb_image's (77 R + 150 G + 29 B) >> 8; 3: RGB, gray replicated). An empty root, or a class
/// without PNGs, is an error.
#pragma once

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "idx.hpp"
#include "png.hpp"

namespace promoe::io {

namespace detail {

inline bool has_png_extension(const std::filesystem::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".png";
}

inline bool is_hidden(const std::filesystem::path& p) {
  const std::string name = p.filename().string();
  return !name.empty() && name[0] == '.';
}

}  // namespace detail

/// Loads root/<class>/**.png into [N, H, W, C] pixels with C = channels (1 or 3), labels by
/// class (sorted names), and class_names. Images are ordered by class, then by path.
inline labelled_images load_image_folder(const std::string& root, int channels) {
  namespace fs = std::filesystem;
  PROMOE_CHECK(channels == 1 || channels == 3, "load_image_folder: channels is ", channels, "; expected 1 or 3");
  std::error_code ec;
  const fs::file_status st = fs::status(root, ec);
  if (ec || !fs::exists(st)) fail(root, ": no such folder");
  if (!fs::is_directory(st)) fail(root, ": not a folder");

  std::vector<fs::path> classes;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    if (detail::is_hidden(it->path())) continue;
    std::error_code dec;
    if (it->is_directory(dec)) classes.push_back(it->path());
  }
  if (ec) fail(root, ": cannot list the folder (", ec.message(), ")");
  if (classes.empty()) fail(root, ": no class sub-folders (expected root/<class>/<image>.png)");
  std::sort(classes.begin(), classes.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });

  labelled_images out;
  out.C = channels;
  std::string first;  // the file that fixed H and W
  for (std::size_t k = 0; k < classes.size(); ++k) {
    std::vector<fs::path> files;
    for (fs::recursive_directory_iterator it(classes[k], ec), end; !ec && it != end; it.increment(ec)) {
      if (detail::is_hidden(it->path())) {
        if (it->is_directory(ec)) it.disable_recursion_pending();
        ec.clear();
        continue;
      }
      std::error_code fec;
      if (it->is_regular_file(fec) && detail::has_png_extension(it->path())) files.push_back(it->path());
    }
    if (ec) fail(classes[k].string(), ": cannot list the folder (", ec.message(), ")");
    if (files.empty()) fail(classes[k].string(), ": class folder holds no .png files");
    std::sort(files.begin(), files.end());
    out.class_names.push_back(classes[k].filename().string());
    for (const fs::path& file : files) {
      image img = read_png(file.string(), channels);
      if (out.N == 0) {
        out.H = img.H;
        out.W = img.W;
        first = file.string();
      } else if (img.H != out.H || img.W != out.W) {
        fail(file.string(), ": image is ", img.W, " x ", img.H, " (W x H) but '", first, "' is ", out.W, " x ", out.H,
             "; all images must share one size");
      }
      out.pixels.insert(out.pixels.end(), img.pixels.begin(), img.pixels.end());
      out.labels.push_back(static_cast<std::int64_t>(k));
      ++out.N;
    }
  }
  return out;
}

}  // namespace promoe::io
