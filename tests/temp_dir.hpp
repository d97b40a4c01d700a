// SPDX-License-Identifier: Apache-2.0
/// \file temp_dir.hpp
/// \brief temp_dir: the tests' fresh, empty folder under the system's temporary directory,
/// unique per process and per instance, removed at scope exit.
#pragma once

#include <algorithm>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace promoe_test {

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& tag) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() / ("promoe_test_" + tag + "_" + process_id() + "_" +
                                                     std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  /// The path of `name` inside the folder.
  std::string file(const std::string& name) const { return (path / name).string(); }
  /// The names in the folder, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  static std::string process_id() {
#if defined(__unix__) || defined(__APPLE__)
    return std::to_string(::getpid());
#else
    return "0";
#endif
  }
};

}  // namespace promoe_test
