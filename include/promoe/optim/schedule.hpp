// SPDX-License-Identifier: Apache-2.0
/// \file schedule.hpp
/// \brief optim::schedule: the learning rate as a function of the step, a linear warm-up then
/// constant (DiT) or a cosine decay to a floor.
///
/// `step` is the number of optimizer steps already taken, so the update about to be made is
/// `opt.step(sched.lr_at(opt.step()))`:
///
///  - warm-up (step < warmup_steps): lr * (step + 1) / warmup_steps, so the first update uses
///    lr / warmup_steps (never 0) and update warmup_steps - 1 the full lr;
///  - constant: lr from then on;
///  - cosine: from step warmup_steps to total_steps,
///        min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2,
///    which is lr at warmup_steps and min_lr at total_steps; min_lr after that.
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe::optim {

class schedule {
 public:
  /// Linear warm-up over warmup_steps (0: none), then constant lr.
  explicit schedule(double lr = 1e-4, index_t warmup_steps = 0) : lr_(lr), warmup_(warmup_steps) {
    check_common_("optim::schedule");
  }

  /// Linear warm-up over warmup_steps, then a cosine decay from lr to min_lr at total_steps.
  static schedule cosine(double lr, index_t warmup_steps, index_t total_steps, double min_lr = 0.0) {
    schedule s(lr, warmup_steps);
    PROMOE_CHECK(total_steps > warmup_steps, "optim::schedule::cosine: total_steps (", total_steps,
                 ") must exceed warmup_steps (", warmup_steps, ")");
    PROMOE_CHECK(std::isfinite(min_lr) && min_lr >= 0.0 && min_lr <= lr,
                 "optim::schedule::cosine: min_lr must be in [0, lr] = [0, ", lr, "], got ", min_lr);
    s.total_ = total_steps;
    s.min_lr_ = min_lr;
    s.cosine_ = true;
    return s;
  }

  /// The learning rate of the update made after `step` updates (step >= 0).
  double lr_at(index_t step) const {
    PROMOE_CHECK(step >= 0, "optim::schedule::lr_at: step must be >= 0, got ", step);
    if (step < warmup_) return lr_ * static_cast<double>(step + 1) / static_cast<double>(warmup_);
    if (!cosine_) return lr_;
    if (step >= total_) return min_lr_;
    const double progress = static_cast<double>(step - warmup_) / static_cast<double>(total_ - warmup_);
    return min_lr_ + (lr_ - min_lr_) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }

  double base_lr() const { return lr_; }
  index_t warmup_steps() const { return warmup_; }
  bool is_cosine() const { return cosine_; }
  /// Where the cosine reaches min_lr (0 for a constant schedule).
  index_t total_steps() const { return total_; }
  double min_lr() const { return cosine_ ? min_lr_ : lr_; }

 private:
  void check_common_(const char* where) const {
    PROMOE_CHECK(std::isfinite(lr_) && lr_ > 0.0, where, ": lr must be finite and > 0, got ", lr_);
    PROMOE_CHECK(warmup_ >= 0, where, ": warmup_steps must be >= 0, got ", warmup_);
  }

  double lr_;
  index_t warmup_;
  index_t total_ = 0;
  double min_lr_ = 0.0;
  bool cosine_ = false;
};

}  // namespace promoe::optim
