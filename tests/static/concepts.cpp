// SPDX-License-Identifier: Apache-2.0
/// \file concepts.cpp
/// \brief Compile-time test: the policy concepts accept the library's policies and reject
/// types that miss a member. Nothing here runs; the TU compiling is the test.

#include <cstdint>
#include <string>

#include <promoe/promoe.hpp>
#if defined(PROMOE_TEST_THRUST)
#include <promoe/backend/thrust.hpp>
#endif

#include "bad_router.hpp"

namespace pm = promoe;
using pm::index_t;

// ---- the library's policies --------------------------------------------------
static_assert(pm::RouterPolicy<pm::router::top_k>);
static_assert(pm::RouterPolicy<pm::router::prototypical>);
static_assert(pm::RouterPolicy<pm::router::conditional<pm::router::top_k>>);
static_assert(pm::RouterPolicy<pm::router::promoe>);
static_assert(pm::LossPolicy<pm::loss::routing_contrastive>);
static_assert(pm::ExpertPolicy<pm::expert::mlp<pm::act::gelu_tanh>>);
static_assert(pm::ExpertPolicy<pm::expert::mlp<pm::act::gelu>>);
static_assert(pm::ExpertPolicy<pm::expert::mlp<pm::act::silu>>);
static_assert(pm::ExpertPolicy<pm::expert::mlp<pm::act::relu>>);
static_assert(pm::ExpertPolicy<pm::expert::swiglu>);
static_assert(pm::LossPolicy<pm::loss::load_balance>);
static_assert(pm::LossPolicy<pm::loss::z_loss>);
static_assert(pm::Backend<pm::backend::cpu>);
#if defined(PROMOE_TEST_THRUST)
static_assert(pm::Backend<pm::backend::thrust>);
#endif
static_assert(pm::ActivationPolicy<pm::act::gelu_tanh>);
static_assert(pm::ActivationPolicy<pm::act::gelu>);
static_assert(pm::ActivationPolicy<pm::act::silu>);
static_assert(pm::ActivationPolicy<pm::act::relu>);

// ---- routers -------------------------------------------------------------------
// A forwarding wrapper of top_k is a router; the same wrapper without slots_per_token is not.
static_assert(pm::RouterPolicy<promoe_static::good_router>);
static_assert(!pm::RouterPolicy<promoe_static::bad_router>);

namespace neg {

struct empty {};

struct router_without_impl {
  struct options {};
};

/// impl exists but cannot be built from (options, layout, rng).
struct router_wrong_constructor {
  struct options {};
  template <class T, class B>
  struct impl {
    struct cache {};
    impl() = default;
    index_t slots_per_token() const { return 1; }
    void forward(const pm::route_input<T>&, cache&, pm::dispatch_plan<T, B>&) {}
    void backward(const pm::route_input<T>&, cache&, const pm::dispatch_plan<T, B>&, const T*, pm::matrix_view<T>) {}
    void zero_grad() {}
    template <class F>
    void for_each_parameter(F&&) {}
  };
};

// ---- experts -------------------------------------------------------------------
struct expert_without_bank {
  static constexpr index_t cache_width(index_t h) { return h; }
  static constexpr index_t scratch_width(index_t h) { return h; }
};

/// A bank without backward().
struct expert_without_backward {
  static constexpr index_t cache_width(index_t h) { return h; }
  static constexpr index_t scratch_width(index_t h) { return h; }
  template <class T, class B>
  struct bank {
    bank(index_t, index_t, index_t) {}
    void init(pm::rng&) {}
    void zero_grad() {}
    void forward(index_t, pm::const_matrix_view<T>, pm::matrix_view<T>, pm::matrix_view<T>, bool) const {}
    template <class F>
    void for_each_parameter(index_t, const std::string&, const pm::param_naming&, F&&) {}
  };
};

/// The same bank with backward() is an expert (so the negative above is for the right reason).
struct expert_complete : expert_without_backward {
  template <class T, class B>
  struct bank : expert_without_backward::bank<T, B> {
    using expert_without_backward::bank<T, B>::bank;
    void backward(index_t, pm::const_matrix_view<T>, pm::const_matrix_view<T>, pm::const_matrix_view<T>,
                  pm::matrix_view<T>, bool, pm::matrix_view<T>, const T*) {}
  };
};

// ---- losses --------------------------------------------------------------------
template <bool WithName, bool WithWeight>
struct loss_variant {
  struct options_with_weight {
    double weight = 1;
  };
  struct options_without_weight {};
  using options = std::conditional_t<WithWeight, options_with_weight, options_without_weight>;
  template <class T, class B>
  struct impl {
    struct cache {};
    impl(const options&, const pm::router_layout&) {}
    T forward(const pm::loss_input<T, B>&, cache&) const { return T(0); }
    void backward(const pm::loss_input<T, B>&, cache&) const {}
  };
};
template <bool WithWeight>
struct named_loss : loss_variant<true, WithWeight> {
  static constexpr const char* name = "named";
};

// ---- backends ------------------------------------------------------------------
/// A tag whose traits have buffers and parallel_for but nothing else.
struct partial_backend {};

// ---- activations ---------------------------------------------------------------
struct activation_without_derivative {
  template <class T>
  static T value(T x) { return x; }
};

}  // namespace neg

namespace promoe {
template <>
struct backend_traits<neg::partial_backend> {
  template <class T>
  using buffer = std::vector<T>;
  template <class F>
  static void parallel_for(index_t n, F f) {
    for (index_t i = 0; i < n; ++i) f(i);
  }
};
}  // namespace promoe

static_assert(!pm::RouterPolicy<neg::empty>);
static_assert(!pm::RouterPolicy<neg::router_without_impl>);
static_assert(!pm::RouterPolicy<neg::router_wrong_constructor>);
static_assert(!pm::RouterPolicy<pm::expert::swiglu>);

static_assert(!pm::ExpertPolicy<neg::empty>);
static_assert(!pm::ExpertPolicy<neg::expert_without_bank>);
static_assert(!pm::ExpertPolicy<neg::expert_without_backward>);
static_assert(pm::ExpertPolicy<neg::expert_complete>);
static_assert(!pm::ExpertPolicy<pm::router::top_k>);

static_assert(!pm::LossPolicy<neg::empty>);
static_assert(!pm::LossPolicy<neg::loss_variant<false, true>>);  // no name
static_assert(!pm::LossPolicy<neg::named_loss<false>>);          // options without weight
static_assert(pm::LossPolicy<neg::named_loss<true>>);            // both: a loss
static_assert(!pm::LossPolicy<pm::router::top_k>);

static_assert(!pm::Backend<neg::partial_backend>);

static_assert(!pm::ActivationPolicy<neg::empty>);
static_assert(!pm::ActivationPolicy<neg::activation_without_derivative>);

// moe_layer's defaults name valid policies, and a layer type with them is complete.
using default_layer = pm::moe_layer<pm::router::top_k, pm::expert::mlp<pm::act::gelu_tanh>>;
static_assert(std::is_same_v<default_layer::scalar, float>);
static_assert(std::is_same_v<default_layer::backend_type, pm::backend::cpu>);
static_assert(default_layer::num_losses == 0);
static_assert(pm::moe_layer<pm::router::top_k, pm::expert::mlp<pm::act::gelu_tanh>,
                            pm::losses<pm::loss::load_balance, pm::loss::z_loss>, pm::backend::cpu, double,
                            pm::expert::swiglu>::num_losses == 2);
