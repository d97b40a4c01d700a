// SPDX-License-Identifier: Apache-2.0
/// \file loss_input.hpp
/// \brief What auxiliary losses read from a router (loss_input) and the buffers their
/// gradients go to (loss_gradients), which the router folds into its own backward.
#pragma once

#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/view.hpp"
#include "dispatch_plan.hpp"

namespace promoe {

/// A token's weight in the losses: its mask value, or 1 without a mask.
template <class T>
PROMOE_HOST_DEVICE inline T token_weight(const T* mask, index_t t) {
  return mask ? mask[t] : T(1);
}

/// The routed tokens as the losses see them. A conditional router shows the losses the tokens
/// of labelled samples only: either just those tokens, or all tokens with a mask that is 0 for
/// the rest (then the losses count, average over and send gradients to the masked-in tokens
/// only). Gradient pointers are null in the forward.
template <class T, class B>
struct loss_input {
  const T* logits = nullptr;  ///< [tokens, experts] routing logits
  index_t tokens = 0;
  const T* token_mask = nullptr;  ///< [tokens] 1 for a token the losses count, 0 for one they skip; null: all count
  index_t counted = 0;            ///< the number of tokens the losses count (`tokens` without a mask)
  index_t experts = 0;                        ///< routed experts
  const dispatch_plan<T, B>* plan = nullptr;  ///< the routing of these tokens (expert ids 0..experts-1)
  const_matrix_view<T> x;                     ///< [tokens, D] the routed tokens
  const T* prototypes = nullptr;              ///< [experts, D] for prototype routers, else null
  T* dlogits = nullptr;                       ///< [tokens, experts] losses add their gradients here
  T* dx = nullptr;                            ///< [tokens, D]
  T* dprototypes = nullptr;                   ///< [experts, D] (the router's parameter gradient)
};

/// The gradient buffers of loss_input, kept in a router's cache.
template <class T, class B>
struct loss_gradients {
  tensor<T, B> dlogits;  ///< [tokens, experts]
  tensor<T, B> dx;       ///< [tokens, D]
  bool active = false;   ///< set by prepare(), cleared by the router's backward once folded in

  void prepare(index_t tokens, index_t experts, index_t dim) {
    dlogits.resize({tokens, experts});
    dx.resize({tokens, dim});
    dlogits.fill(T(0));
    dx.fill(T(0));
    active = true;
  }

  /// The losses' logit gradients, or null when no loss ran backward.
  const T* extra_dlogits() const { return active ? dlogits.data() : nullptr; }

  /// Adds the losses' token gradients into dx and marks the buffers consumed.
  void fold_into(matrix_view<T> token_grad) {
    if (active) ops::add<B>(dx.cmatrix(), token_grad);
    active = false;
  }

  /// The loss_input of a router over tokens x with `logits`; with for_backward the gradient
  /// buffers are prepared and pointed to.
  loss_input<T, B> view(const T* logits, const_matrix_view<T> x, index_t experts, const dispatch_plan<T, B>& plan,
                        bool for_backward, const T* prototypes = nullptr, T* dprototypes = nullptr) {
    loss_input<T, B> li{logits, x.rows, nullptr, x.rows, experts, &plan, x, prototypes};
    if (for_backward) {
      prepare(x.rows, experts, x.cols);
      li.dlogits = dlogits.data();
      li.dx = dx.data();
      li.dprototypes = dprototypes;
    }
    return li;
  }
};

}  // namespace promoe
