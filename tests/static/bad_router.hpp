// SPDX-License-Identifier: Apache-2.0
/// \file bad_router.hpp
/// \brief Router policies for the compile-time tests: `good_router` forwards everything to
/// router::top_k and is a RouterPolicy; `bad_router` is the same minus slots_per_token(),
/// so it is not one.
#pragma once

#include <promoe/router/top_k.hpp>

namespace promoe_static {

template <bool WithSlotsPerToken>
struct forwarding_router {
  using options = promoe::router::top_k::options;

  template <class T, class B>
  class impl {
    using inner_t = promoe::router::top_k::impl<T, B>;

   public:
    using cache = typename inner_t::cache;

    impl(const options& o, const promoe::router_layout& layout, promoe::rng& gen) : inner_(o, layout, gen) {}

    promoe::index_t slots_per_token() const
      requires WithSlotsPerToken
    {
      return inner_.slots_per_token();
    }
    void forward(const promoe::route_input<T>& in, cache& c, promoe::dispatch_plan<T, B>& plan) const {
      inner_.forward(in, c, plan);
    }
    void backward(const promoe::route_input<T>& in, cache& c, const promoe::dispatch_plan<T, B>& plan,
                  const T* dgate, promoe::matrix_view<T> dx) {
      inner_.backward(in, c, plan, dgate, dx);
    }
    void zero_grad() { inner_.zero_grad(); }
    template <class F>
    void for_each_parameter(F&& f) {
      inner_.for_each_parameter(static_cast<F&&>(f));
    }

   private:
    inner_t inner_;
  };
};

using good_router = forwarding_router<true>;
using bad_router = forwarding_router<false>;

}  // namespace promoe_static
