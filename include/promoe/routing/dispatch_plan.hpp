// SPDX-License-Identifier: Apache-2.0
/// \file dispatch_plan.hpp
/// \brief The dispatch plan: for each token its slots (expert, gate), and the tokens grouped
/// into per-expert contiguous row blocks by one stable counting sort.
///
/// A router fills `slot_expert` and `slot_gate` ([tokens, slots_per_token], expert -1 for an
/// empty slot) and calls `group()`. The layer then gathers token rows into expert order,
/// runs each expert on its block and combines back. Backward reuses the plan: nothing is
/// re-sorted. Combining gathers per token (no atomics), so results do not depend on thread
/// scheduling.
#pragma once

#include <cstdint>
#include <vector>

#include "../backend/backend.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/lane_sum.hpp"
#include "../core/view.hpp"

namespace promoe {

namespace routing {
/// slot_row[row_slot[r]] = r. (Functors launched as CUDA kernels must not be private types.)
struct invert_functor {
  const index_t* row_slot;  // [rows]
  index_t* slot_row;        // [tokens * slots]
  PROMOE_HOST_DEVICE void operator()(index_t r) const { slot_row[row_slot[r]] = r; }
};
}  // namespace routing

template <class T, class B>
struct dispatch_plan {
  using traits = backend_traits<B>;

  index_t tokens = 0;
  index_t slots_per_token = 0;
  index_t experts = 0;                     ///< expert ids are 0..experts-1
  tensor<std::int32_t, B> slot_expert;     ///< [tokens * slots]: expert id, -1 when empty
  tensor<T, B> slot_gate;                  ///< [tokens * slots]: gate value
  tensor<index_t, B> slot_row;             ///< [tokens * slots]: row in expert order, -1 when empty
  tensor<index_t, B> row_slot;             ///< [rows]: the slot each expert-ordered row came from
  tensor<index_t, B> offsets;              ///< [experts + 1]: expert e owns rows offsets[e]..offsets[e+1]
  std::vector<index_t> host_offsets;       ///< the same offsets on the host, for the GEMM loop

  /// Sizes the slot arrays and empties every slot.
  void reset(index_t num_tokens, index_t slots, index_t num_experts) {
    tokens = num_tokens;
    slots_per_token = slots;
    experts = num_experts;
    slot_expert.resize({tokens * slots});
    slot_gate.resize({tokens * slots});
    slot_row.resize({tokens * slots});
    slot_expert.fill(-1);
    slot_gate.fill(T(0));
    offsets.resize({experts + 1});
  }

  index_t rows() const { return host_offsets.empty() ? 0 : host_offsets.back(); }
  index_t expert_rows(index_t e) const { return host_offsets[e + 1] - host_offsets[e]; }

  /// Groups the filled slots by expert (stable: token order within an expert).
  void group() {
    const index_t n = tokens * slots_per_token;
    row_slot.resize({n});
    traits::group_by_key(slot_expert.data(), n, experts, row_slot.data(), offsets.data());
    host_offsets.resize(static_cast<std::size_t>(experts + 1));
    traits::copy_to_host(offsets.data(), experts + 1, host_offsets.data());
    row_slot.resize({host_offsets.back()});
    slot_row.fill(-1);
    traits::parallel_for(rows(), routing::invert_functor{row_slot.data(), slot_row.data()});
  }

  /// Per-expert token counts on the host.
  std::vector<index_t> counts() const {
    std::vector<index_t> c(static_cast<std::size_t>(experts));
    for (index_t e = 0; e < experts; ++e) c[e] = expert_rows(e);
    return c;
  }

};

namespace routing {

/// xp[r, :] = x[token of row r, :]
template <class T>
struct gather_functor {
  const T* x;  // [tokens, d], leading dimension ldx
  index_t ldx;
  const index_t* row_slot;  // [rows]
  index_t slots, d;
  T* xp;  // [rows, d]
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const T* src = x + (row_slot[r] / slots) * ldx;
    T* dst = xp + r * d;
    for (index_t j = 0; j < d; ++j) dst[j] = src[j];
  }
};

/// y[t, :] (+)= sum over t's filled slots of gate * yp[row, :]. With no gates (null) it is
/// the plain sum: the backward of gather.
template <class T>
struct combine_functor {
  const T* yp;             // [rows, d] rows in expert order
  const index_t* slot_row;  // [tokens * slots]
  const T* slot_gate;       // [tokens * slots], or null for gates of 1
  index_t slots, d;
  T* y;  // [tokens, d], leading dimension ldy
  index_t ldy;
  bool accumulate;
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    T* out = y + t * ldy;
    if constexpr (is_storage_half_v<T>) {
      // bf16: each element's slots summed in float and rounded once
      const index_t* rows = slot_row + t * slots;
      for (index_t j = 0; j < d; ++j) {
        compute_t<T> acc = accumulate ? compute_t<T>(out[j]) : compute_t<T>(0);
        for (index_t s = 0; s < slots; ++s)
          if (rows[s] >= 0) acc += compute_t<T>(slot_gate ? slot_gate[t * slots + s] : T(1)) * yp[rows[s] * d + j];
        out[j] = T(acc);
      }
      return;
    }
    if (!accumulate)
      for (index_t j = 0; j < d; ++j) out[j] = T(0);
    for (index_t s = 0; s < slots; ++s) {
      const index_t r = slot_row[t * slots + s];
      if (r < 0) continue;
      const T g = slot_gate ? slot_gate[t * slots + s] : T(1);
      const T* src = yp + r * d;
      for (index_t j = 0; j < d; ++j) out[j] += g * src[j];
    }
  }
};

/// Backward of combine: dyp[r] = gate * dy[t]; dgate[slot] = <dy[t], yp[r]>.
template <class T>
struct combine_backward_functor {
  const T* dy;  // [tokens, d], leading dimension lddy
  index_t lddy;
  const T* yp;             // [rows, d]
  const index_t* row_slot;  // [rows]
  const T* slot_gate;       // [tokens * slots]
  index_t slots, d;
  T* dyp;    // [rows, d]
  T* dgate;  // [tokens * slots]; slots of no row are left as they are (zeroed by the caller)
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    const index_t s = row_slot[r];
    const T* g = dy + (s / slots) * lddy;
    const T* v = yp + r * d;
    const T gate = slot_gate[s];
    T* out = dyp + r * d;
    for (index_t j = 0; j < d; ++j) out[j] = gate * g[j];
    dgate[s] = lane_sum<compute_t<T>>(d, [g, v](index_t j) { return g[j] * v[j]; });
  }
};

/// Gathers token rows into expert order: xp [plan.rows(), d] (contiguous); x may be strided.
template <class B, class T>
void gather(const dispatch_plan<T, B>& plan, const_matrix_view<T> x, matrix_view<T> xp) {
  backend_traits<B>::parallel_for(
      plan.rows(), gather_functor<T>{x.data, x.ld, plan.row_slot.data(), plan.slots_per_token, x.cols, xp.data});
}

/// Gate-weighted sum of expert rows back into token order.
template <class B, class T>
void combine(const dispatch_plan<T, B>& plan, const_matrix_view<T> yp, matrix_view<T> y, bool accumulate) {
  backend_traits<B>::parallel_for(plan.tokens, combine_functor<T>{yp.data, plan.slot_row.data(), plan.slot_gate.data(),
                                                                 plan.slots_per_token, y.cols, y.data, y.ld, accumulate});
}

/// Backward of combine; dgate must hold tokens*slots values and is overwritten.
template <class B, class T>
void combine_backward(const dispatch_plan<T, B>& plan, const_matrix_view<T> dy, const_matrix_view<T> yp,
                      matrix_view<T> dyp, T* dgate) {
  backend_traits<B>::fill(dgate, plan.tokens * plan.slots_per_token, T(0));
  backend_traits<B>::parallel_for(plan.rows(),
                                  combine_backward_functor<T>{dy.data, dy.ld, yp.data, plan.row_slot.data(),
                                                              plan.slot_gate.data(), plan.slots_per_token, dy.cols,
                                                              dyp.data, dgate});
}

/// Backward of gather: sums each token's expert-row gradients into dx.
template <class B, class T>
void scatter_rows(const dispatch_plan<T, B>& plan, const_matrix_view<T> dxp, matrix_view<T> dx, bool accumulate) {
  backend_traits<B>::parallel_for(plan.tokens, combine_functor<T>{dxp.data, plan.slot_row.data(), nullptr,
                                                                 plan.slots_per_token, dx.cols, dx.data, dx.ld,
                                                                 accumulate});
}

}  // namespace routing
}  // namespace promoe
