// SPDX-License-Identifier: Apache-2.0
/// \file running_thresholds.hpp
/// \brief running_thresholds: inference thresholds learned during training as running
/// averages tau <- m tau + (1 - m) s (expert-choice and Expert Race routers), saved as a
/// buffer in T and averaged on the host in compute_t<T>.
#pragma once

#include <cstddef>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"

namespace promoe {

/// `count` thresholds: the buffer (T, in the backend's memory, saved with the model) and their
/// running average in compute_t<T> on the host. In bf16 the average itself would round away
/// every update below half a bf16 step (with m = 0.95, tau would stall anywhere within about
/// 8 % of its target), so only the stored value is rounded. A buffer written from outside
/// (a checkpoint load) is noticed at the next read and restarts the average from it.
template <class T, class B>
class running_thresholds {
 public:
  using average_type = compute_t<T>;

  void reset(index_t count, double initial) {
    buffer_.resize({count});
    buffer_.fill(static_cast<T>(initial));
    const auto n = static_cast<std::size_t>(count);
    average_.assign(n, static_cast<average_type>(initial));
    host_.assign(n, static_cast<T>(initial));
    written_ = host_;
  }

  /// The thresholds as stored (read from the buffer; one copy to the host).
  const std::vector<T>& read() {
    buffer_.to_host(host_);
    for (std::size_t i = 0; i < host_.size(); ++i)
      if (!(host_[i] == written_[i])) average_[i] = static_cast<average_type>(host_[i]);
    return host_;
  }

  /// tau_i <- momentum tau_i + (1 - momentum) s, after read(); store() writes the buffer.
  void update(index_t i, double momentum, T s) {
    auto& a = average_[static_cast<std::size_t>(i)];
    a = static_cast<average_type>(momentum * static_cast<double>(a) + (1 - momentum) * static_cast<double>(s));
    host_[static_cast<std::size_t>(i)] = static_cast<T>(a);
  }
  void store() {
    backend_traits<B>::copy_from_host(host_.data(), static_cast<index_t>(host_.size()), buffer_.data());
    written_ = host_;
  }

  T* data() { return buffer_.data(); }
  index_t size() const { return buffer_.size(); }

 private:
  tensor<T, B> buffer_;
  std::vector<average_type> average_;
  std::vector<T> host_, written_;
};

}  // namespace promoe
