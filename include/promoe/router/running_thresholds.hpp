// SPDX-License-Identifier: Apache-2.0
/// \file running_thresholds.hpp
/// \brief running_thresholds: inference thresholds learned during training as running
/// averages tau <- m tau + (1 - m) s (expert-choice and Expert Race routers), saved as a
/// buffer in T and averaged in compute_t<T>, all in the backend's memory.
#pragma once

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"

namespace promoe {

namespace detail {
/// Threshold i: a buffer value that differs from the one last written was loaded from
/// outside and restarts the average; then average <- m average + (1 - m) s_i, and the
/// buffer holds the average rounded to T.
template <class T>
struct running_threshold_update_functor {
  const T* s;  // [count] this batch's values
  double momentum;
  compute_t<T>* average;
  T* buffer;
  T* written;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    if (!(buffer[i] == written[i])) average[i] = static_cast<compute_t<T>>(buffer[i]);
    average[i] = static_cast<compute_t<T>>(momentum * static_cast<double>(average[i]) +
                                           (1 - momentum) * static_cast<double>(s[i]));
    buffer[i] = static_cast<T>(average[i]);
    written[i] = buffer[i];
  }
};
}  // namespace detail

/// `count` thresholds: the buffer (T, saved with the model) and their running average in
/// compute_t<T>, both in the backend's memory, so an update needs no copy to the host. In
/// bf16 the average itself would round away every update below half a bf16 step (with
/// m = 0.95, tau would stall anywhere within about 8 % of its target), so only the stored
/// value is rounded. A buffer written from outside (a checkpoint load) is noticed at the next
/// update and restarts the average from it.
template <class T, class B>
class running_thresholds {
 public:
  using average_type = compute_t<T>;

  void reset(index_t count, double initial) {
    for (auto* t : {&buffer_, &written_}) {
      t->resize({count});
      t->fill(static_cast<T>(initial));
    }
    average_.resize({count});
    average_.fill(static_cast<average_type>(initial));
  }

  /// tau_i <- momentum tau_i + (1 - momentum) s[i] for every i (s in the backend's memory).
  void update(const T* s, double momentum) {
    if (size() > 0)
      backend_traits<B>::parallel_for(size(), detail::running_threshold_update_functor<T>{
                                                  s, momentum, average_.data(), buffer_.data(), written_.data()});
  }

  /// The thresholds as stored, in the backend's memory.
  T* data() { return buffer_.data(); }
  const T* data() const { return buffer_.data(); }
  index_t size() const { return buffer_.size(); }

 private:
  tensor<T, B> buffer_, written_;
  tensor<average_type, B> average_;
};

}  // namespace promoe
