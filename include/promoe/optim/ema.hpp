// SPDX-License-Identifier: Apache-2.0
/// \file ema.hpp
/// \brief optim::ema<T, B>: an exponential moving average of a model's parameters (and,
/// optionally, its buffers), as DiT's update_ema:
///
///     shadow = shadow * decay;  shadow = shadow + (1 - decay) * value
///     # ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)
///
/// The shadow starts as a copy of the values. shadow() names its tensors like the parameters,
/// so a checkpoint saves them as the EMA model's state dict; copy_to() / swap() put the
/// averages into the live model for sampling. bf16 parameters are averaged in float32 (an
/// update of (1 - decay) * (value - shadow) with decay 0.9999 is far below a bf16 ulp of the
/// shadow, so a bf16 average would never move); copy_to() and swap() round the averages into
/// the bf16 values. The ema keeps the value pointers it was built
/// from: the parameters must outlive it and not be reallocated.
#pragma once

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::optim {

namespace detail {

/// shadow[i] = shadow[i] * decay + one_minus_decay * value[i], in PyTorch's order; S is the
/// shadow's type (float for bf16 values).
template <class T, class S>
struct ema_update_functor {
  S* shadow;
  const T* value;
  S decay, one_minus_decay;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const S s = shadow[i] * decay;
    shadow[i] = s + one_minus_decay * static_cast<S>(value[i]);
  }
};

/// Exchanges a[i] and b[i].
template <class T>
struct swap_functor {
  T* a;
  T* b;
  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    const T t = a[i];
    a[i] = b[i];
    b[i] = t;
  }
};

}  // namespace detail

template <class T, class B>
class ema {
 public:
  using traits = backend_traits<B>;
  using value_type = T;
  using shadow_type = compute_t<T>;  ///< the averages' type: float for bf16 values

  /// Tracks every entry of `params` with a gradient (a parameter) and, when include_buffers,
  /// also those without one (buffers); the shadow starts as a copy of their values.
  /// decay is in [0, 1] (DiT: 0.9999).
  explicit ema(const std::vector<named_parameter<T>>& params, double decay = 0.9999, bool include_buffers = false)
      : decay_(decay) {
    check_decay_(decay, "optim::ema");
    std::set<std::string> names;
    for (const auto& p : params) {
      if (p.grad == nullptr && !include_buffers) continue;
      const index_t n = p.size();
      PROMOE_CHECK(n == 0 || p.value != nullptr, "optim::ema: entry '", p.name, "' has no value");
      PROMOE_CHECK(names.insert(p.name).second, "optim::ema: name '", p.name,
                   "' appears twice; shadow names must be unique");
      tracked_.push_back({p.name, p.shape, p.value, nullptr});
      shadow_.emplace_back(p.shape);
      ops::convert<B>(p.value, n, shadow_.back().data());
    }
  }

  /// shadow = decay * shadow + (1 - decay) * value with the configured decay.
  void update() { update(decay_); }
  /// The same with a decay for this call only (a warm-up schedule of the decay, say).
  void update(double decay) {
    check_decay_(decay, "optim::ema::update");
    for (std::size_t k = 0; k < tracked_.size(); ++k) {
      const index_t n = tracked_[k].size();
      if (n == 0) continue;
      traits::parallel_for(n, detail::ema_update_functor<T, shadow_type>{shadow_[k].data(), tracked_[k].value,
                                                                         static_cast<shadow_type>(decay),
                                                                         static_cast<shadow_type>(1.0 - decay)});
    }
  }

  /// shadow = value for every tracked entry (a restart of the average).
  void reset() {
    for (std::size_t k = 0; k < tracked_.size(); ++k)
      ops::convert<B>(tracked_[k].value, tracked_[k].size(), shadow_[k].data());
  }

  double decay() const { return decay_; }
  void set_decay(double decay) {
    check_decay_(decay, "optim::ema::set_decay");
    decay_ = decay;
  }

  /// The averages as named views into the ema's memory (names and shapes of the tracked
  /// entries, grad null). Writing through the pointers restores a checkpoint.
  std::vector<named_parameter<shadow_type>> shadow() {
    std::vector<named_parameter<shadow_type>> out;
    out.reserve(tracked_.size());
    for (std::size_t k = 0; k < tracked_.size(); ++k)
      out.push_back({tracked_[k].name, tracked_[k].shape, shadow_[k].data(), nullptr});
    return out;
  }

  /// The tracked entries (value pointers of the live model, grad null), in order.
  const std::vector<named_parameter<T>>& tracked() const { return tracked_; }

  /// Writes the averages into the entries of `params` with the same names (any model with
  /// the same naming: the live one, or an inference copy). Every shadow tensor must find an
  /// entry of the same shape; entries of `params` without a shadow are left alone.
  void copy_to(const std::vector<named_parameter<T>>& params) const {
    const auto by_name = index_of_(params);
    for (std::size_t k = 0; k < tracked_.size(); ++k)
      ops::convert<B>(shadow_[k].data(), tracked_[k].size(), match_(params, by_name, k, "optim::ema::copy_to").value);
  }

  /// Exchanges the averages with the values of the matching entries of `params` (same rules
  /// as copy_to). Calling it twice restores both: swap, sample with the EMA weights, swap back.
  /// bf16 values: the first call keeps the live values aside and writes the rounded averages,
  /// the second puts the live values back (the float averages are never rounded); so between
  /// the two calls shadow() still holds the averages, and update() must not run.
  void swap(const std::vector<named_parameter<T>>& params) {
    const auto by_name = index_of_(params);
    // Every entry matched before any is written: a failed match leaves everything as it was.
    std::vector<T*> lives(tracked_.size());
    for (std::size_t k = 0; k < tracked_.size(); ++k) lives[k] = match_(params, by_name, k, "optim::ema::swap").value;
    if constexpr (!std::is_same_v<T, shadow_type>) {
      if (set_aside_.empty())
        for (const auto& t : tracked_) set_aside_.emplace_back(t.shape);
    }
    for (std::size_t k = 0; k < tracked_.size(); ++k) {
      T* live = lives[k];
      const index_t n = tracked_[k].size();
      if (n == 0) continue;
      if constexpr (std::is_same_v<T, shadow_type>) {
        traits::parallel_for(n, detail::swap_functor<T>{shadow_[k].data(), live});
      } else if (!swapped_) {
        traits::copy(live, n, set_aside_[k].data());
        ops::convert<B>(shadow_[k].data(), n, live);
      } else {
        traits::copy(set_aside_[k].data(), n, live);
      }
    }
    if constexpr (!std::is_same_v<T, shadow_type>) swapped_ = !swapped_;
  }

 private:
  static void check_decay_(double decay, const char* where) {
    PROMOE_CHECK(decay >= 0.0 && decay <= 1.0, where, ": decay must be in [0, 1], got ", decay);
  }

  /// name -> position in params (the first entry of a name wins).
  static std::map<std::string, std::size_t> index_of_(const std::vector<named_parameter<T>>& params) {
    std::map<std::string, std::size_t> out;
    for (std::size_t i = 0; i < params.size(); ++i) out.emplace(params[i].name, i);
    return out;
  }

  /// The entry of params named like tracked entry k, shape checked.
  const named_parameter<T>& match_(const std::vector<named_parameter<T>>& params,
                                   const std::map<std::string, std::size_t>& by_name, std::size_t k,
                                   const char* where) const {
    const auto& want = tracked_[k];
    const auto it = by_name.find(want.name);
    PROMOE_CHECK(it != by_name.end(), where, ": no entry named '", want.name, "' to receive the average");
    const auto& p = params[it->second];
    PROMOE_CHECK(p.shape == want.shape, where, ": '", want.name, "' has shape ", promoe::detail::shape_string(p.shape),
                 ", the average has shape ", promoe::detail::shape_string(want.shape));
    PROMOE_CHECK(p.size() == 0 || p.value != nullptr, where, ": '", want.name, "' has no value");
    return p;
  }

  double decay_;
  std::vector<named_parameter<T>> tracked_;
  std::vector<tensor<shadow_type, B>> shadow_;
  std::vector<tensor<T, B>> set_aside_;  ///< live bf16 values while swapped out (bf16 only)
  bool swapped_ = false;
};

}  // namespace promoe::optim
