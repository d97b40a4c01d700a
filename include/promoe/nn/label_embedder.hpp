// SPDX-License-Identifier: Apache-2.0
/// \file label_embedder.hpp
/// \brief nn::label_embedder: DiT's `y_embedder`, an embedding table with num_classes + 1 rows
/// (the last, index num_classes, is the null label of classifier-free guidance), and the
/// label dropout of training (nn::drop_labels, the reference token_drop).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../backend/counting_sort.hpp"
#include "../backend/init.hpp"
#include "../backend/tensor.hpp"
#include "../core/bf16.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "parameter.hpp"

namespace promoe::nn {

namespace detail {
/// Throws promoe::error naming the first label outside [0, num_classes] (the null label
/// num_classes included).
inline void check_labels(const char* fn, std::span<const std::int64_t> labels, std::int64_t num_classes) {
  for (std::size_t i = 0; i < labels.size(); ++i)
    PROMOE_CHECK(labels[i] >= 0 && labels[i] <= num_classes, fn, ": labels[", i, "] = ", labels[i],
                 " is outside [0, ", num_classes, "] (", num_classes, " classes; ", num_classes,
                 " is the null label)");
}

/// y[s, :] = table[labels[s], :] for one sample.
template <class T>
struct label_gather_functor {
  const T* table;  // [num_classes + 1, D]
  const std::int64_t* labels;  // [n]
  T* y;  // [n, D], leading dimension ld
  index_t ld, dim;
  PROMOE_HOST_DEVICE void operator()(index_t s) const {
    const T* src = table + labels[s] * dim;
    T* dst = y + s * ld;
    for (index_t j = 0; j < dim; ++j) dst[j] = src[j];
  }
};

/// grad[label, j] += Σ dy[s, j] over the samples s of each label, for one column j: each
/// thread owns a column, so no two threads write the same element; a label's samples are
/// summed in compute_t<T> in index order (`order`: the samples sorted by label, stably) and
/// added once, so a bf16 table does not round after every sample.
template <class T>
struct label_scatter_add_functor {
  const T* dy;  // [n, D], leading dimension ld
  index_t ld;
  const std::int64_t* labels;  // [n]
  const index_t* order;        // [n] samples sorted by label
  index_t n, dim;
  T* grad;  // [num_classes + 1, D]
  PROMOE_HOST_DEVICE void operator()(index_t j) const {
    compute_t<T> acc = 0;
    for (index_t k = 0; k < n; ++k) {
      const index_t s = order[k];
      acc += static_cast<compute_t<T>>(dy[s * ld + j]);
      if (k + 1 == n || labels[order[k + 1]] != labels[s]) {
        T& g = grad[labels[s] * dim + j];
        g = static_cast<T>(static_cast<compute_t<T>>(g) + acc);
        acc = 0;
      }
    }
  }
};
}  // namespace detail

/// Label dropout (the reference token_drop with force_drop_ids = None): a copy of labels in
/// which labels[i] becomes the null label num_classes when rng::uniform(gen.seed(), stream, i)
/// < prob. Counter-based, so the result is a pure function of (seed, stream, i): pass
/// gen.next_stream() or a stream derived from the training step. Labels are checked to lie
/// in [0, num_classes].
/// Writes into `out` (resized; no allocation once it has the capacity).
inline void drop_labels(std::span<const std::int64_t> labels, std::int64_t num_classes, double prob, const rng& gen,
                        std::uint64_t stream, std::vector<std::int64_t>& out) {
  PROMOE_CHECK(num_classes >= 1, "drop_labels: num_classes must be positive, got ", num_classes);
  PROMOE_CHECK(prob >= 0.0 && prob <= 1.0, "drop_labels: the dropout probability must be in [0, 1], got ", prob);
  detail::check_labels("drop_labels", labels, num_classes);
  out.assign(labels.begin(), labels.end());
  for (std::size_t i = 0; i < out.size(); ++i)
    if (gen.uniform(stream, i) < prob) out[i] = num_classes;
}
inline std::vector<std::int64_t> drop_labels(std::span<const std::int64_t> labels, std::int64_t num_classes,
                                             double prob, const rng& gen, std::uint64_t stream) {
  std::vector<std::int64_t> out;
  drop_labels(labels, num_classes, prob, gen, stream, out);
  return out;
}

/// Forced label dropout (the reference token_drop with force_drop_ids): labels[i] becomes the
/// null label num_classes where force_drop_ids[i] == 1 and stays where it is 0 (any other
/// value is an error). Used for the unconditional half of classifier-free guidance.
inline std::vector<std::int64_t> drop_labels(std::span<const std::int64_t> labels, std::int64_t num_classes,
                                             std::span<const std::int64_t> force_drop_ids) {
  PROMOE_CHECK(num_classes >= 1, "drop_labels: num_classes must be positive, got ", num_classes);
  PROMOE_CHECK(force_drop_ids.size() == labels.size(), "drop_labels: force_drop_ids has ", force_drop_ids.size(),
               " entries, expected one per label (", labels.size(), ")");
  detail::check_labels("drop_labels", labels, num_classes);
  std::vector<std::int64_t> out(labels.begin(), labels.end());
  for (std::size_t i = 0; i < out.size(); ++i) {
    PROMOE_CHECK(force_drop_ids[i] == 0 || force_drop_ids[i] == 1, "drop_labels: force_drop_ids[", i, "] = ",
                 force_drop_ids[i], ", expected 0 (keep) or 1 (drop)");
    if (force_drop_ids[i] == 1) out[i] = num_classes;
  }
  return out;
}

template <class T, class B>
class label_embedder {
 public:
  using backend_type = B;
  using value_type = T;
  /// The prefix of this module in the reference DiT state dict.
  static constexpr const char* default_prefix = "y_embedder.";

  /// What backward needs; owned by the caller, reused across calls.
  struct cache {
    tensor<std::int64_t, B> labels;  ///< [n] the labels of the last forward (backend memory)
    tensor<index_t, B> order;        ///< [n] its samples sorted by label (stable)
    std::vector<index_t> order_host, label_offsets;
    index_t rows = 0;                ///< n of the last forward
  };

  label_embedder() = default;
  /// A table [num_classes + 1, dim]; row num_classes is the null label.
  label_embedder(index_t num_classes, index_t dim) : classes_(num_classes), dim_(dim) {
    PROMOE_CHECK(num_classes >= 1 && dim >= 1, "nn::label_embedder: num_classes and dim must be positive, got ",
                 num_classes, " and ", dim);
    table.resize({num_classes + 1, dim});
  }

  index_t num_classes() const { return classes_; }
  /// The label of the unconditional (classifier-free guidance) embedding: num_classes.
  std::int64_t null_label() const { return classes_; }
  index_t dim() const { return dim_; }

  /// Table ~ N(0, 0.02^2) (DiT's initialize_weights).
  void init(rng& gen) { init::normal<B>(table.value.data(), table.value.size(), 0.02, gen); }

  /// y [n, D] = table rows of the host labels [n]; each label must lie in [0, num_classes].
  void forward(std::span<const std::int64_t> labels, matrix_view<T> y, cache& c) const {
    const auto n = static_cast<index_t>(labels.size());
    detail::check_labels("nn::label_embedder", labels, classes_);
    PROMOE_CHECK(y.rows == n && y.cols == dim_, "nn::label_embedder: y is [", y.rows, ", ", y.cols, "], expected [",
                 n, ", ", dim_, "] (one row per label)");
    c.rows = n;
    c.labels.resize({n});
    if (n == 0) return;
    backend_traits<B>::copy_from_host(labels.data(), n, c.labels.data());
    // samples by label, stable (a counting sort; labels lie in [0, num_classes])
    c.order_host.resize(static_cast<std::size_t>(n));
    c.label_offsets.resize(static_cast<std::size_t>(classes_ + 2));
    promoe::detail::host_group_by_key(labels.data(), n, classes_ + 1, c.order_host.data(), c.label_offsets.data());
    c.order.resize({n});
    backend_traits<B>::copy_from_host(c.order_host.data(), n, c.order.data());
    backend_traits<B>::parallel_for(
        n, detail::label_gather_functor<T>{table.value.data(), c.labels.data(), y.data, y.ld, dim_});
  }

  /// table.grad[labels[s], :] += dy[s, :] (race-free and deterministic: one thread per column;
  /// each label's samples summed first, in compute_t<T>).
  void backward(const_matrix_view<T> dy, cache& c) {
    PROMOE_CHECK(dy.rows == c.rows && dy.cols == dim_, "nn::label_embedder::backward: dy is [", dy.rows, ", ",
                 dy.cols, "], expected [", c.rows, ", ", dim_, "] (the forward's y)");
    if (c.rows == 0) return;
    backend_traits<B>::parallel_for(dim_, detail::label_scatter_add_functor<T>{dy.data, dy.ld, c.labels.data(),
                                                                                c.order.data(), c.rows, dim_,
                                                                                table.grad.data()});
  }

  /// Random label dropout with this table's null label (see nn::drop_labels).
  std::vector<std::int64_t> drop_labels(std::span<const std::int64_t> labels, double prob, const rng& gen,
                                        std::uint64_t stream) const {
    return nn::drop_labels(labels, classes_, prob, gen, stream);
  }
  /// Forced label dropout with this table's null label (see nn::drop_labels).
  std::vector<std::int64_t> drop_labels(std::span<const std::int64_t> labels,
                                        std::span<const std::int64_t> force_drop_ids) const {
    return nn::drop_labels(labels, classes_, force_drop_ids);
  }

  void zero_grad() { table.zero_grad(); }

  /// f(named_parameter) for `prefix`embedding_table.weight [num_classes + 1, D] (prefix
  /// "y_embedder." in DiT).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    f(table.named(prefix + "embedding_table.weight"));
  }

  parameter<T, B> table;  ///< [num_classes + 1, D]

 private:
  index_t classes_ = 0, dim_ = 0;
};

}  // namespace promoe::nn
