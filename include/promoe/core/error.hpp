// SPDX-License-Identifier: Apache-2.0
/// \file error.hpp
/// \brief promoe::error and the PROMOE_CHECK macro with messages built from any streamable values.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace promoe {

/// Every failure the library reports on bad input is a promoe::error whose message names
/// the function, the tensor or option involved and what was expected.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

/// "[3, 64]": the way shapes appear in every message.
template <class Int>
std::string shape_string(const std::vector<Int>& dims) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << ']';
  return os.str();
}

}  // namespace detail

/// Throws promoe::error with the concatenation of its arguments.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw error(detail::concat(args...));
}

}  // namespace promoe

/// PROMOE_CHECK(cond, "moe_layer: x has ", x.cols(), " columns, expected ", d);
/// Throws promoe::error with the message when cond is false. Always on: these guard the
/// library's API, not its internals.
#define PROMOE_CHECK(cond, ...)                  \
  do {                                           \
    if (!(cond)) ::promoe::fail(__VA_ARGS__);    \
  } while (0)
