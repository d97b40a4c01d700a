// SPDX-License-Identifier: Apache-2.0
/// \file bank_size.hpp
/// \brief bank_size: the (count, dim, hidden) every expert bank carries, with accessors.
#pragma once

#include "../core/config.hpp"

namespace promoe::expert {

/// `count` experts, each mapping width `dim` through hidden width `hidden`.
class bank_size {
 public:
  bank_size() = default;
  bank_size(index_t count, index_t dim, index_t hidden) : count_(count), dim_(dim), hidden_(hidden) {}

  index_t count() const { return count_; }
  index_t dim() const { return dim_; }
  index_t hidden() const { return hidden_; }

 protected:
  index_t count_ = 0, dim_ = 0, hidden_ = 0;
};

}  // namespace promoe::expert
