// SPDX-License-Identifier: Apache-2.0
/// \file train_feature_net.hpp
/// \brief eval::train_feature_net: trains a feature_net as a classifier (softmax
/// cross-entropy, AdamW, linear warm-up then cosine decay to 0, the training set reshuffled
/// every epoch from the seed). Deterministic for a seed and thread count.
///
/// The defaults train the 784-512-256-10 Fashion-MNIST classifier of promoe-evaluate to about
/// 89 % test accuracy in 5 epochs (lr 1e-3 gave 88.8 %, 3e-3 89.0 %, batch 64 89.2 % at twice
/// the time; random left-right flips did not help in 5 epochs).
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "../backend/tensor.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../optim/adamw.hpp"
#include "../optim/schedule.hpp"
#include "feature_net.hpp"
#include "images.hpp"

namespace promoe::eval {

struct feature_net_training {
  index_t epochs = 5;
  index_t batch = 128;
  double lr = 2e-3;              ///< AdamW learning rate after the warm-up
  index_t warmup_steps = 200;    ///< linear warm-up (capped below the total number of steps)
  double weight_decay = 1e-4;    ///< AdamW's decoupled weight decay
  std::uint64_t seed = 0;        ///< the order of the training images
};

/// What the progress callback sees after every step.
struct training_progress {
  index_t epoch = 0, epochs = 0;  ///< 0-based epoch, and how many
  index_t step = 0, steps = 0;    ///< steps done (>= 1), and how many in all
  double lr = 0;                  ///< the learning rate of the step just made
  double loss = 0;                ///< mean loss over this epoch's steps so far
  double accuracy = 0;            ///< training accuracy over this epoch's images so far
  bool end_of_epoch = false;
};

/// Trains net on `train` (images with labels in [0, classes)); progress(const
/// training_progress&) is called after every step.
template <class T, class B, class Progress>
void train_feature_net(feature_net<T, B>& net, const image_set& train, const feature_net_training& o,
                       Progress&& progress) {
  const auto& cfg = net.config();
  PROMOE_CHECK(o.epochs >= 1 && o.batch >= 1 && o.warmup_steps >= 0, "train_feature_net: epochs (", o.epochs,
               ") and batch (", o.batch, ") must be >= 1 and warmup_steps (", o.warmup_steps, ") >= 0");
  PROMOE_CHECK(train.shape == cfg.input, "train_feature_net: training images of shape [", train.shape.height, ", ",
               train.shape.width, ", ", train.shape.channels, "], the network expects [", cfg.input.height, ", ",
               cfg.input.width, ", ", cfg.input.channels, "]");
  PROMOE_CHECK(train.n >= 1 && static_cast<index_t>(train.labels.size()) == train.n, "train_feature_net: ", train.n,
               " training images with ", train.labels.size(), " labels");
  check_labels(train.labels, cfg.classes, "train_feature_net: training labels");

  const index_t per_epoch = (train.n + o.batch - 1) / o.batch;
  const index_t steps = per_epoch * o.epochs;
  const index_t warmup = std::min(o.warmup_steps, steps - 1);
  const optim::schedule sched = optim::schedule::cosine(o.lr, warmup, steps, 0.0);
  optim::adamw<T, B> opt(net.parameters(), {.lr = o.lr, .weight_decay = o.weight_decay});

  const index_t in = cfg.in_features(), k = cfg.classes;
  rng gen(o.seed);
  std::vector<index_t> order(static_cast<std::size_t>(train.n));
  std::vector<T> host_x;
  std::vector<std::int64_t> labels;
  std::vector<T> host_logits;
  tensor<T, B> x, dlogits;
  typename feature_net<T, B>::cache c;
  cross_entropy_workspace<T, B> ws;
  training_progress p;
  p.epochs = o.epochs;
  p.steps = steps;
  for (index_t epoch = 0; epoch < o.epochs; ++epoch) {
    // Fisher-Yates with the epoch's own stream.
    for (index_t i = 0; i < train.n; ++i) order[static_cast<std::size_t>(i)] = i;
    const auto stream = gen.next_stream();
    for (index_t i = train.n - 1; i > 0; --i) {
      const auto j = static_cast<index_t>(gen.uniform(stream, static_cast<std::uint64_t>(i)) * static_cast<double>(i + 1));
      std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(std::min(j, i))]);
    }
    double loss_sum = 0;
    index_t seen = 0, right = 0;
    for (index_t b = 0; b < per_epoch; ++b) {
      const index_t first = b * o.batch, rows = std::min(o.batch, train.n - first);
      host_x.resize(static_cast<std::size_t>(rows * in));
      labels.resize(static_cast<std::size_t>(rows));
      for (index_t r = 0; r < rows; ++r) {
        const index_t src = order[static_cast<std::size_t>(first + r)];
        std::copy_n(train.pixels.begin() + src * in, in, host_x.begin() + r * in);
        labels[static_cast<std::size_t>(r)] = train.labels[static_cast<std::size_t>(src)];
      }
      x.resize({rows, in});
      backend_traits<B>::copy_from_host(host_x.data(), rows * in, x.data());
      net.forward(x.cmatrix(), c);
      dlogits.resize({rows, k});
      const double loss = softmax_cross_entropy<T, B>(c.logits.cmatrix(), labels, dlogits.matrix(), ws);
      net.zero_grad();
      net.backward(dlogits.cmatrix(), c);
      p.lr = sched.lr_at(opt.step());
      opt.step(p.lr);

      c.logits.to_host(host_logits);
      for (index_t r = 0; r < rows; ++r) {
        index_t best = 0;
        for (index_t j = 1; j < k; ++j)
          if (host_logits[r * k + j] > host_logits[r * k + best]) best = j;
        right += best == labels[static_cast<std::size_t>(r)];
      }
      loss_sum += loss;
      seen += rows;
      p.epoch = epoch;
      p.step = epoch * per_epoch + b + 1;
      p.loss = loss_sum / static_cast<double>(b + 1);
      p.accuracy = static_cast<double>(right) / static_cast<double>(seen);
      p.end_of_epoch = b + 1 == per_epoch;
      progress(static_cast<const training_progress&>(p));
    }
  }
}

}  // namespace promoe::eval
