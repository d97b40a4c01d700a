// SPDX-License-Identifier: Apache-2.0
/// \file adamw.hpp
/// \brief optim::adamw<T, B>: torch.optim.AdamW (decoupled weight decay, bias correction,
/// no amsgrad, no maximize) over the named_parameter list a model hands out.
///
/// Per parameter and step t (1-based), with lr the learning rate passed to step(lr):
///
///     p  = p * (1 - lr * weight_decay)              # param.mul_(1 - lr * weight_decay)
///     m  = m * beta1;  m = m + (1 - beta1) * g      # exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
///     v  = v * beta2;  v = v + (1 - beta2) * g * g  # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
///     denom = sqrt(v) / sqrt(1 - beta2^t) + eps
///     p  = p + (-(lr / (1 - beta1^t)) * m) / denom  # param.addcdiv_(m, denom, value=-step_size)
///
/// That is PyTorch's single-tensor (foreach=False) implementation operation by operation:
/// the scalars (1 - lr * wd, bias corrections, step size) are computed in double as Python
/// does and cast to T, the element math runs in T. In float64 the result agrees with PyTorch
/// to the last bit or two (PyTorch's vectorised CPU kernels may fuse a multiply-add; PyTorch
/// >= 2.0 writes the first moment as a lerp, which rounds differently by an ulp).
///
/// bf16 parameters (T = bf16) train with float32 master weights: the optimizer keeps a float
/// copy of every parameter (`master.<name>` in state()) and float moments, runs the update on
/// the master copy with the widened bf16 gradient, and writes the master rounded to bf16 back
/// into the parameter; updates smaller than a bf16 ulp of the weight accumulate in the master
/// instead of being lost. For float and double parameters there is no master copy.
///
/// Entries whose grad pointer is null (buffers) are skipped. The optimizer keeps the value and
/// grad pointers it was built from: the parameters must outlive it and not be reallocated.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::optim {

/// torch.optim.AdamW's hyper-parameters and defaults, except lr (DiT's 1e-4) and
/// weight_decay (DiT's 0; PyTorch's default is 1e-2).
struct adamw_options {
  double lr = 1e-4;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

namespace detail {

/// One AdamW update of element i; the operation order is PyTorch's (see the file comment).
/// S is the state's type: T itself, or float for bf16 parameters, whose update runs on the
/// master copy and is rounded into the parameter.
template <class T, class S = compute_t<T>>
struct adamw_step_functor {
  static constexpr bool keeps_master = !std::is_same_v<T, S>;
  T* param;
  const T* grad;
  S* master;  // [n] float32 master weights (keeps_master), else unused
  S* exp_avg;
  S* exp_avg_sq;
  S decay;  // 1 - lr * weight_decay
  S beta1, one_minus_beta1, beta2, one_minus_beta2;
  S bias_correction2_sqrt, eps, neg_step_size;

  PROMOE_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const S g = grad[i];
    S p = (keeps_master ? master[i] : S(param[i])) * decay;
    S m = exp_avg[i] * beta1;
    m = m + one_minus_beta1 * g;
    S v = exp_avg_sq[i] * beta2;
    v = v + one_minus_beta2 * g * g;
    const S denom = sqrt(v) / bias_correction2_sqrt + eps;
    p = p + neg_step_size * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (keeps_master) master[i] = p;
    param[i] = T(p);
  }
};

/// master[i] = value[i], widened.
template <class T, class S>
struct widen_functor {
  const T* value;
  S* master;
  PROMOE_HOST_DEVICE void operator()(index_t i) const { master[i] = static_cast<S>(value[i]); }
};

}  // namespace detail

template <class T, class B>
class adamw {
 public:
  using traits = backend_traits<B>;
  using value_type = T;
  using state_type = compute_t<T>;  ///< master weights and moments: float for bf16 parameters
  using options_type = adamw_options;
  static constexpr bool keeps_master = !std::is_same_v<T, state_type>;

  /// Takes every entry of `params` with a non-null grad; the state starts at zero, step 0
  /// (bf16 parameters: the master weights start as the parameters' values).
  explicit adamw(const std::vector<named_parameter<T>>& params, adamw_options options = {}) : opt_(options) {
    validate_(opt_);
    std::set<std::string> names;
    for (const auto& p : params) {
      if (p.grad == nullptr) continue;
      const index_t n = p.size();
      PROMOE_CHECK(n == 0 || p.value != nullptr, "optim::adamw: parameter '", p.name, "' has a gradient but no value");
      PROMOE_CHECK(names.insert(p.name).second, "optim::adamw: parameter name '", p.name,
                   "' appears twice; state names must be unique");
      params_.push_back(p);
      exp_avg_.emplace_back(p.shape);
      exp_avg_sq_.emplace_back(p.shape);
      exp_avg_.back().fill(state_type(0));
      exp_avg_sq_.back().fill(state_type(0));
      if constexpr (keeps_master) master_.emplace_back(p.shape);
      for (index_t first = 0; first < n; first += update_piece)
        pieces_.push_back({params_.size() - 1, first, std::min(update_piece, n - first)});
    }
    reload_master();
  }

  /// Copies the parameters' current values into the master weights (bf16 parameters; no-op
  /// otherwise): after the parameters were written from outside (a model-only checkpoint
  /// loaded after the optimizer was made). A checkpoint of state() restores the masters.
  void reload_master() {
    if constexpr (keeps_master)
      for (std::size_t k = 0; k < params_.size(); ++k)
        if (params_[k].size() > 0)
          traits::parallel_for(params_[k].size(), detail::widen_functor<T, state_type>{params_[k].value, master_[k].data()});
  }

  /// One update of every parameter with learning rate lr (lr also scales the weight decay,
  /// as in PyTorch); then step() has grown by one.
  void step(double lr) {
    PROMOE_CHECK(std::isfinite(lr) && lr >= 0.0, "optim::adamw::step: learning rate must be finite and >= 0, got ", lr);
    ++step_;
    const double t = static_cast<double>(step_);
    const double bias_correction1 = 1.0 - std::pow(opt_.beta1, t);
    const double bias_correction2 = 1.0 - std::pow(opt_.beta2, t);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(bias_correction2);
    const auto update = [&](std::size_t k) {
      using S = state_type;
      return detail::adamw_step_functor<T>{params_[k].value,
                                           params_[k].grad,
                                           keeps_master ? master_[k].data() : nullptr,
                                           exp_avg_[k].data(),
                                           exp_avg_sq_[k].data(),
                                           static_cast<S>(1.0 - lr * opt_.weight_decay),
                                           static_cast<S>(opt_.beta1),
                                           static_cast<S>(1.0 - opt_.beta1),
                                           static_cast<S>(opt_.beta2),
                                           static_cast<S>(1.0 - opt_.beta2),
                                           static_cast<S>(bias_correction2_sqrt),
                                           static_cast<S>(opt_.eps),
                                           static_cast<S>(-step_size)};
    };
    if constexpr (traits::concurrent_tasks) {
      // Pieces of every tensor as tasks of one parallel pass: most tensors are too small for a
      // parallel loop of their own, which would leave the other threads waiting.
      traits::parallel_tasks(static_cast<index_t>(pieces_.size()), [&](index_t t) {
        const piece& pc = pieces_[static_cast<std::size_t>(t)];
        const auto f = update(pc.param);
        for (index_t i = pc.first; i < pc.first + pc.size; ++i) f(i);
      });
    } else {
      for (std::size_t k = 0; k < params_.size(); ++k)
        if (params_[k].size() > 0) traits::parallel_for(params_[k].size(), update(k));
    }
  }

  /// Steps taken so far (PyTorch's state['step']; the same for every parameter here).
  [[nodiscard]] std::int64_t step() const { return step_; }
  /// Restores the step count (with state(), a checkpoint round trip).
  void set_step(std::int64_t s) {
    PROMOE_CHECK(s >= 0, "optim::adamw::set_step: step must be >= 0, got ", s);
    step_ = s;
  }

  /// The state tensors as named views into the optimizer's memory, grad null:
  /// `exp_avg.<name>` then `exp_avg_sq.<name>` for each optimised parameter, in order (bf16
  /// parameters: `master.<name>` first). Writing through the pointers restores a checkpoint
  /// (then set_step()).
  std::vector<named_parameter<state_type>> state() {
    std::vector<named_parameter<state_type>> out;
    out.reserve(3 * params_.size());
    for (std::size_t k = 0; k < params_.size(); ++k) {
      if constexpr (keeps_master)
        out.push_back({"master." + params_[k].name, params_[k].shape, master_[k].data(), nullptr});
      out.push_back({"exp_avg." + params_[k].name, params_[k].shape, exp_avg_[k].data(), nullptr});
      out.push_back({"exp_avg_sq." + params_[k].name, params_[k].shape, exp_avg_sq_[k].data(), nullptr});
    }
    return out;
  }

  /// The parameters being optimised (the entries with a grad), in the given order.
  const std::vector<named_parameter<T>>& parameters() const { return params_; }
  const adamw_options& options() const { return opt_; }
  /// Changes the hyper-parameters from the next step on (the state is kept).
  void set_options(const adamw_options& options) {
    validate_(options);
    opt_ = options;
  }

 private:
  static void validate_(const adamw_options& o) {
    PROMOE_CHECK(std::isfinite(o.lr) && o.lr >= 0.0, "optim::adamw: lr must be finite and >= 0, got ", o.lr);
    PROMOE_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0, "optim::adamw: beta1 must be in [0, 1), got ", o.beta1);
    PROMOE_CHECK(o.beta2 >= 0.0 && o.beta2 < 1.0, "optim::adamw: beta2 must be in [0, 1), got ", o.beta2);
    PROMOE_CHECK(std::isfinite(o.eps) && o.eps >= 0.0, "optim::adamw: eps must be finite and >= 0, got ", o.eps);
    PROMOE_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0,
                 "optim::adamw: weight_decay must be finite and >= 0, got ", o.weight_decay);
  }

  adamw_options opt_;
  /// Elements of a parameter updated by one task (backends with concurrent tasks).
  static constexpr index_t update_piece = index_t{1} << 15;
  struct piece {
    std::size_t param;
    index_t first, size;
  };

  std::vector<named_parameter<T>> params_;
  std::vector<tensor<state_type, B>> exp_avg_, exp_avg_sq_;
  std::vector<tensor<state_type, B>> master_;  ///< float32 master weights (bf16 parameters only)
  std::vector<piece> pieces_;  ///< every parameter in pieces of at most update_piece elements
  std::int64_t step_ = 0;
};

}  // namespace promoe::optim
