// SPDX-License-Identifier: Apache-2.0
/// \file feature_net.hpp
/// \brief eval::feature_net<T, B>: the image classifier whose penultimate-layer features the
/// sample evaluator compares (FD, precision / recall) and whose predictions give the class
/// accuracy of conditional samples. A convolution-free MLP on flattened images in [-1, 1]:
///
///     fc1: Linear(H*W*C, hidden1) -> GELU (tanh) -> fc2: Linear(hidden1, hidden2) -> GELU (tanh)
///       = features [N, hidden2] -> fc3: Linear(hidden2, classes) = logits [N, classes]
///
/// (784 -> 512 -> 256 -> 10 for Fashion-MNIST). Parameters are named as a PyTorch state dict
/// of that nn.Sequential-free module: "fc1.weight", "fc1.bias", ..., "fc3.bias". Besides the
/// network: softmax_cross_entropy (its training loss), embed() (features and predicted
/// classes of an image_set, in batches) and save_feature_net / load_feature_net (an
/// io checkpoint with group "model" and the network's config as the checkpoint config, so a
/// file of another architecture, a truncated or a corrupt file is refused by name).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "../backend/init.hpp"
#include "../backend/ops.hpp"
#include "../backend/tensor.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/view.hpp"
#include "../expert/activation.hpp"
#include "../io/checkpoint.hpp"
#include "../nn/linear.hpp"
#include "images.hpp"

namespace promoe::eval {

/// The classifier's sizes: input image shape, two hidden widths, number of classes.
struct feature_net_config {
  image_shape input{28, 28, 1};
  index_t hidden1 = 512;
  index_t hidden2 = 256;  ///< the feature dimension
  index_t classes = 10;

  index_t in_features() const { return input.size(); }

  void validate() const {
    PROMOE_CHECK(input.height >= 1 && input.width >= 1 && input.channels >= 1 && hidden1 >= 1 && hidden2 >= 1 &&
                     classes >= 2,
                 "feature_net_config: sizes must be positive and classes >= 2, got input [", input.height, ", ",
                 input.width, ", ", input.channels, "], hidden ", hidden1, ", ", hidden2, ", classes ", classes);
  }

  /// The checkpoint config: loading compares it (as JSON) with the file's.
  std::string to_json() const {
    return ::promoe::detail::concat("{\"model\": \"promoe.eval.feature_net\", \"input\": [", input.height, ", ", input.width,
                          ", ", input.channels, "], \"input_range\": [-1, 1], \"hidden\": [", hidden1, ", ", hidden2,
                          "], \"classes\": ", classes, ", \"activation\": \"gelu_tanh\"}");
  }
};

namespace detail {

/// Row r: loss[r] = logsumexp(z[r, :]) - z[r, y[r]]; when dz, dz[r, :] = (softmax(z[r, :]) -
/// onehot(y[r])) * scale.
template <class T>
struct softmax_cross_entropy_functor {
  const T* z;
  index_t ldz, cols;
  const std::int64_t* y;
  T* loss;
  T* dz;  // may be null
  index_t lddz;
  T scale;
  PROMOE_HOST_DEVICE void operator()(index_t r) const {
    using std::exp;
    using std::log;
    const T* zr = z + r * ldz;
    T m = zr[0];
    for (index_t j = 1; j < cols; ++j) m = zr[j] > m ? zr[j] : m;
    T s = T(0);
    for (index_t j = 0; j < cols; ++j) s += exp(zr[j] - m);
    const index_t label = static_cast<index_t>(y[r]);
    loss[r] = m + log(s) - zr[label];
    if (dz) {
      T* d = dz + r * lddz;
      for (index_t j = 0; j < cols; ++j) d[j] = (exp(zr[j] - m) / s - (j == label ? T(1) : T(0))) * scale;
    }
  }
};

}  // namespace detail

/// Buffers of softmax_cross_entropy (reused across calls).
template <class T, class B>
struct cross_entropy_workspace {
  tensor<std::int64_t, B> labels;
  tensor<T, B> loss;
};

/// Mean softmax cross-entropy of logits [N, K] (backend memory) against labels (host, in
/// [0, K)); writes its gradient (softmax - onehot) / N into dlogits unless dlogits is empty.
template <class T, class B>
double softmax_cross_entropy(const_matrix_view<T> logits, std::span<const std::int64_t> labels,
                             matrix_view<T> dlogits, cross_entropy_workspace<T, B>& ws) {
  const index_t n = logits.rows, k = logits.cols;
  PROMOE_CHECK(n >= 1 && k >= 1, "softmax_cross_entropy: logits [", n, ", ", k, "] are empty");
  PROMOE_CHECK(static_cast<index_t>(labels.size()) == n, "softmax_cross_entropy: ", labels.size(), " labels for ", n,
               " rows of logits");
  PROMOE_CHECK(!dlogits.data || (dlogits.rows == n && dlogits.cols == k), "softmax_cross_entropy: dlogits [",
               dlogits.rows, ", ", dlogits.cols, "], expected [", n, ", ", k, "]");
  for (std::size_t i = 0; i < labels.size(); ++i)
    PROMOE_CHECK(labels[i] >= 0 && labels[i] < k, "softmax_cross_entropy: label ", labels[i], " of row ", i,
                 " is outside 0..", k - 1);
  ws.labels.resize({n});
  ws.loss.resize({n});
  backend_traits<B>::copy_from_host(labels.data(), n, ws.labels.data());
  backend_traits<B>::parallel_for(
      n, detail::softmax_cross_entropy_functor<T>{logits.data, logits.ld, k, ws.labels.data(), ws.loss.data(),
                                                  dlogits.data, dlogits.ld, T(1) / static_cast<T>(n)});
  return static_cast<double>(backend_traits<B>::sum(ws.loss.data(), n)) / static_cast<double>(n);
}

template <class T, class B = backend::cpu>
class feature_net {
 public:
  using scalar = T;
  using backend_type = B;
  using traits = backend_traits<B>;

  /// What backward needs: the forward's input (a view: keep it alive and unchanged until
  /// backward) and the layers' pre- and post-activation values; plus gradient buffers.
  struct cache {
    const_matrix_view<T> x;
    tensor<T, B> a1, h1, a2, h2, logits;  // fc1 out, GELU, fc2 out, GELU (features), fc3 out
    tensor<T, B> d1, d2;                  // gradients at h1 / a1 and h2 / a2
    tensor<T, B> ones;

    const_matrix_view<T> features() const { return h2.matrix(); }
  };

  explicit feature_net(const feature_net_config& cfg = {}, rng gen = rng{0}) : cfg_(cfg) {
    cfg_.validate();
    fc1 = nn::linear<T, B>(cfg_.in_features(), cfg_.hidden1);
    fc2 = nn::linear<T, B>(cfg_.hidden1, cfg_.hidden2);
    fc3 = nn::linear<T, B>(cfg_.hidden2, cfg_.classes);
    // PyTorch's nn.Linear default: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
    for (nn::linear<T, B>* l : {&fc1, &fc2, &fc3}) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(l->in_features()));
      init::uniform<B>(l->weight.value.data(), l->weight.value.size(), bound, gen);
      init::uniform<B>(l->bias.value.data(), l->bias.value.size(), bound, gen);
    }
  }

  const feature_net_config& config() const { return cfg_; }
  index_t feature_dim() const { return cfg_.hidden2; }

  /// Forward of x [N, H*W*C] (rows in [-1, 1], backend memory) into the cache: features
  /// c.features() [N, hidden2] and c.logits [N, classes].
  void forward(const_matrix_view<T> x, cache& c) const {
    PROMOE_CHECK(x.cols == cfg_.in_features(), "feature_net: input [", x.rows, ", ", x.cols, "], expected [N, ",
                 cfg_.in_features(), "] (", cfg_.input.height, "x", cfg_.input.width, "x", cfg_.input.channels,
                 " images flattened channels last, values in [-1, 1])");
    const index_t n = x.rows;
    c.x = x;
    c.a1.resize({n, cfg_.hidden1});
    c.h1.resize({n, cfg_.hidden1});
    c.a2.resize({n, cfg_.hidden2});
    c.h2.resize({n, cfg_.hidden2});
    c.logits.resize({n, cfg_.classes});
    if (n == 0) return;
    fc1.forward(x, c.a1.matrix());
    activate_(c.a1, c.h1);
    fc2.forward(c.h1.matrix(), c.a2.matrix());
    activate_(c.a2, c.h2);
    fc3.forward(c.h2.matrix(), c.logits.matrix());
  }

  /// Accumulates the parameter gradients of sum(logits * dlogits) (dlogits [N, classes],
  /// backend memory) for the forward held in the cache.
  void backward(const_matrix_view<T> dlogits, cache& c) {
    const index_t n = c.x.rows;
    PROMOE_CHECK(dlogits.rows == n && dlogits.cols == cfg_.classes, "feature_net::backward: dlogits [", dlogits.rows,
                 ", ", dlogits.cols, "], expected [", n, ", ", cfg_.classes, "] (the forward's batch)");
    if (n == 0) return;
    c.ones.resize({n});
    c.ones.fill(T(1));
    c.d2.resize({n, cfg_.hidden2});
    c.d2.fill(T(0));
    fc3.backward(c.h2.matrix(), dlogits, c.d2.matrix(), c.ones.data());
    activation_backward_(c.a2, c.d2);
    c.d1.resize({n, cfg_.hidden1});
    c.d1.fill(T(0));
    fc2.backward(c.h1.matrix(), c.d2.matrix(), c.d1.matrix(), c.ones.data());
    activation_backward_(c.a1, c.d1);
    fc1.backward(c.x, c.d1.matrix(), matrix_view<T>{}, c.ones.data());
  }

  void zero_grad() {
    fc1.zero_grad();
    fc2.zero_grad();
    fc3.zero_grad();
  }

  /// "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias".
  std::vector<named_parameter<T>> parameters() {
    std::vector<named_parameter<T>> out;
    const auto sink = [&](named_parameter<T> p) { out.push_back(std::move(p)); };
    fc1.for_each_parameter("fc1.", sink);
    fc2.for_each_parameter("fc2.", sink);
    fc3.for_each_parameter("fc3.", sink);
    return out;
  }

  nn::linear<T, B> fc1, fc2, fc3;

 private:
  void activate_(const tensor<T, B>& in, tensor<T, B>& out) const {
    const index_t cols = in.matrix().cols;
    traits::parallel_for(in.matrix().rows,
                         act::apply_rows_functor<act::gelu_tanh, T>{in.data(), cols, out.data(), cols, cols});
  }
  /// d := d * GELU'(pre), in place.
  void activation_backward_(const tensor<T, B>& pre, tensor<T, B>& d) const {
    const index_t cols = pre.matrix().cols;
    traits::parallel_for(pre.matrix().rows, act::backward_rows_functor<act::gelu_tanh, T>{
                                                pre.data(), cols, d.data(), cols, d.data(), cols, cols, false});
  }

  feature_net_config cfg_;
};

/// Features and predicted classes of a set of images (host memory).
struct embedding {
  index_t n = 0, dim = 0;
  std::vector<float> features;             ///< [n, dim]: the penultimate layer
  std::vector<std::int64_t> predictions;   ///< [n]: argmax of the logits

  const_matrix_view<float> matrix() const { return {features.data(), n, dim}; }
};

/// The network on every image of `images` (whose shape must be the network's input shape;
/// `images` names the source in errors through the message), `batch` images at a time.
template <class T, class B>
embedding embed(const feature_net<T, B>& net, const image_set& images, index_t batch = 500) {
  const auto& cfg = net.config();
  PROMOE_CHECK(images.shape == cfg.input, "eval::embed: images of shape [", images.shape.height, ", ",
               images.shape.width, ", ", images.shape.channels, "], the classifier expects [", cfg.input.height, ", ",
               cfg.input.width, ", ", cfg.input.channels, "]");
  PROMOE_CHECK(static_cast<index_t>(images.pixels.size()) == images.n * images.shape.size(), "eval::embed: ",
               images.pixels.size(), " pixel values for ", images.n, " images of ", images.shape.size());
  PROMOE_CHECK(batch >= 1, "eval::embed: batch must be >= 1, got ", batch);
  const index_t d = net.feature_dim(), k = cfg.classes, in = cfg.in_features();
  embedding e;
  e.n = images.n;
  e.dim = d;
  e.features.resize(static_cast<std::size_t>(images.n * d));
  e.predictions.resize(static_cast<std::size_t>(images.n));
  typename feature_net<T, B>::cache c;
  tensor<T, B> x;
  std::vector<T> host_in, host_features, host_logits;
  for (index_t first = 0; first < images.n; first += batch) {
    const index_t rows = std::min(batch, images.n - first);
    host_in.assign(images.pixels.begin() + first * in, images.pixels.begin() + (first + rows) * in);
    x.resize({rows, in});
    backend_traits<B>::copy_from_host(host_in.data(), rows * in, x.data());
    net.forward(x.cmatrix(), c);
    c.h2.to_host(host_features);
    c.logits.to_host(host_logits);
    for (index_t i = 0; i < rows * d; ++i) e.features[static_cast<std::size_t>(first * d + i)] = static_cast<float>(host_features[i]);
    for (index_t r = 0; r < rows; ++r) {
      index_t best = 0;
      for (index_t j = 1; j < k; ++j)
        if (host_logits[r * k + j] > host_logits[r * k + best]) best = j;
      e.predictions[static_cast<std::size_t>(first + r)] = best;
    }
  }
  return e;
}

/// Fraction of predictions equal to labels (same length, at least one).
inline double accuracy(const std::vector<std::int64_t>& predictions, const std::vector<std::int64_t>& labels) {
  PROMOE_CHECK(!labels.empty() && predictions.size() == labels.size(), "eval::accuracy: ", predictions.size(),
               " predictions for ", labels.size(), " labels");
  std::size_t right = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) right += predictions[i] == labels[i];
  return static_cast<double>(right) / static_cast<double>(labels.size());
}

/// Saves the network (group "model", config cfg.to_json()) atomically; extra metadata keys
/// (e.g. "test_accuracy") go with it.
template <class T, class B>
void save_feature_net(const std::string& path, feature_net<T, B>& net,
                      const std::map<std::string, std::string>& extra = {}) {
  io::checkpoint_info info;
  info.config = net.config().to_json();
  info.extra = extra;
  io::save_checkpoint<T, B>(path, {{"model", net.parameters()}}, info);
}

/// Loads a network saved by save_feature_net into `net` (whose config must match the file's;
/// everything is validated before a weight is written) and returns the file's info.
template <class T, class B>
io::checkpoint_info load_feature_net(const std::string& path, feature_net<T, B>& net) {
  return io::load_checkpoint<T, B>(path, {{"model", net.parameters()}}, net.config().to_json());
}

}  // namespace promoe::eval
