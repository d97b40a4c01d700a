// SPDX-License-Identifier: Apache-2.0
/// \file atomic_file.hpp
/// \brief File helpers shared by promoe's readers and writers: atomic writes (a temporary file
/// in the target's directory, flushed to disk, then renamed over the target) and whole-file
/// reads whose errors name the file.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#if defined(_WIN32)
#include <io.h>
#include <process.h>
#else
#include <fcntl.h>
#include <unistd.h>
#endif

#include "../core/error.hpp"

namespace promoe::io {
namespace detail {

inline std::string errno_message(int err) { return std::error_code(err, std::generic_category()).message(); }

/// The temporary file next to target: "<name>.tmp.<pid>.<n>".
inline std::filesystem::path temp_path_for(const std::filesystem::path& target) {
  static std::atomic<std::uint64_t> counter{0};
#if defined(_WIN32)
  const long long pid = _getpid();
#else
  const long long pid = static_cast<long long>(::getpid());
#endif
  std::filesystem::path tmp = target;
  tmp += ".tmp." + std::to_string(pid) + "." + std::to_string(counter.fetch_add(1));
  return tmp;
}

/// A file opened for writing, closed (and its temp removed by the owner) on every path.
class output_file {
 public:
  explicit output_file(const std::filesystem::path& p) {
#if defined(_WIN32)
    const errno_t err = _wfopen_s(&f_, p.c_str(), L"wb");
    if (err != 0 || !f_) error_ = errno_message(err ? err : EIO);
#else
    fd_ = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd_ < 0) error_ = errno_message(errno);
#endif
  }
  output_file(const output_file&) = delete;
  output_file& operator=(const output_file&) = delete;
  ~output_file() { close(); }

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }

  void write(const void* data, std::size_t n) {
    if (!ok() || n == 0) return;
#if defined(_WIN32)
    if (std::fwrite(data, 1, n, f_) != n) error_ = errno_message(errno);
#else
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        error_ = errno_message(errno);
        return;
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
#endif
  }

  /// Flush to the device and close; error() tells whether everything reached the disk.
  void sync_and_close() {
    if (!ok()) return;
#if defined(_WIN32)
    if (std::fflush(f_) != 0 || _commit(_fileno(f_)) != 0) error_ = errno_message(errno);
#else
    if (::fsync(fd_) != 0) error_ = errno_message(errno);
#endif
    const bool closed = close();
    if (ok() && !closed) error_ = errno_message(errno);
  }

 private:
  bool close() {
#if defined(_WIN32)
    if (!f_) return true;
    const bool r = std::fclose(f_) == 0;
    f_ = nullptr;
#else
    if (fd_ < 0) return true;
    const bool r = ::close(fd_) == 0;
    fd_ = -1;
#endif
    return r;
  }

#if defined(_WIN32)
  std::FILE* f_ = nullptr;
#else
  int fd_ = -1;
#endif
  std::string error_;
};

/// After a rename, make the directory entry durable too (best effort; POSIX only).
inline void sync_directory(const std::filesystem::path& dir) {
#if !defined(_WIN32)
  const std::string d = dir.empty() ? std::string(".") : dir.string();
  const int fd = ::open(d.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    (void)::close(fd);
  }
#else
  (void)dir;
#endif
}

}  // namespace detail

/// Writes path atomically: fill(out) writes the contents into a temporary file
/// "<path>.tmp.<pid>.<n>" in the same directory (out is a detail::output_file; call
/// out.write(data, n)), which is flushed to disk and renamed over path. On failure the
/// temporary file is removed, path keeps its old contents, and promoe::error names 'who',
/// the path and the problem.
template <class Fill>
void write_file_atomically(const std::string& path, const std::string& who, Fill&& fill) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  PROMOE_CHECK(target.has_filename(), who, ": '", path, "' does not name a file");
  const fs::path tmp = detail::temp_path_for(target);
  struct remove_on_exit {
    const fs::path& p;
    bool armed = true;
    ~remove_on_exit() {
      std::error_code ec;
      if (armed) fs::remove(p, ec);
    }
  } guard{tmp};
  {
    detail::output_file out(tmp);
    if (!out.ok()) {
      guard.armed = false;  // not created
      fail(who, ": cannot create the temporary file '", tmp.string(), "' for '", path, "': ", out.error());
    }
    fill(out);
    out.sync_and_close();
    if (!out.ok())
      fail(who, ": writing '", path, "' failed (temporary file '", tmp.string(),
           "' removed, the old file is untouched): ", out.error());
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec)
    fail(who, ": cannot move the temporary file '", tmp.string(), "' over '", path, "' (", ec.message(),
         "); the old file is untouched");
  guard.armed = false;
  detail::sync_directory(target.parent_path());
}

/// Writes bytes to path atomically (see the overload above).
inline void write_file_atomically(const std::string& path, const std::string& who, std::span<const std::byte> bytes) {
  write_file_atomically(path, who, [&](detail::output_file& out) { out.write(bytes.data(), bytes.size()); });
}

/// The whole file as bytes. Errors (missing file, a directory, unreadable, larger than
/// max_bytes) name the path.
inline std::vector<std::byte> read_file_bytes(const std::string& path,
                                              std::uint64_t max_bytes = std::numeric_limits<std::uint64_t>::max()) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail(path, ": no such file");
  if (fs::is_directory(st)) fail(path, ": is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open for reading (", detail::errno_message(errno), ")");
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) fail(path, ": cannot determine the file size (", ec.message(), ")");
  if (size > max_bytes) fail(path, ": file has ", size, " bytes, more than the limit of ", max_bytes);
  if (size > std::numeric_limits<std::size_t>::max() / 2) fail(path, ": file of ", size, " bytes does not fit in memory");
  std::vector<std::byte> out(static_cast<std::size_t>(size));
  if (size && !in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(size)))
    fail(path, ": read error (the file has ", in.gcount(), " of its ", size, " bytes readable)");
  if (in.peek() != std::char_traits<char>::eof()) fail(path, ": the file grew while it was read");
  return out;
}

}  // namespace promoe::io
