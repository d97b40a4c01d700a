// SPDX-License-Identifier: Apache-2.0
// promoe-evaluate: scores a .npz of samples (as sample_dit writes it: arr_0 uint8 [N, 28, 28, 1],
// labels int64 [N]) against real Fashion-MNIST images with a feature classifier trained once on
// the Fashion-MNIST training set and cached as a checkpoint:
//
//   FD         Fréchet distance of Gaussians fitted to the classifier's penultimate features
//              of the samples and of the reference (by default the 10000 test images);
//   accuracy   fraction of samples the classifier assigns to their requested label;
//   precision, recall   improved precision / recall (Kynkäänniemi et al. 2019, k = 3) of the
//              sample features against the reference features.
//
// --floor scores the real test set against real training images the same way: the numbers a
// perfect generator would reach.
//
//   promoe-evaluate --samples S.npz [--classifier fmnist_classifier.safetensors]
//                   [--data /usr/share/datasets/fashion-mnist] [--reference R.npz]
//                   [--train-classifier] [--epochs 5] [--seed 0] [--floor] [--json OUT.json]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <promoe/eval.hpp>
#include <promoe/io/atomic_file.hpp>
#include <promoe/io/idx.hpp>

using namespace promoe;
namespace fs = std::filesystem;
using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;

namespace {

using net_type = eval::feature_net<float, backend::cpu>;
constexpr eval::image_shape fmnist_shape{28, 28, 1};
constexpr index_t fmnist_classes = 10;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct options {
  std::string samples, reference, json_out;
  std::string classifier = "fmnist_classifier.safetensors";
  std::string data = io::fashion_mnist_default_dir();
  bool train_classifier = false, floor = false;
  index_t epochs = 5, k = 3, floor_n = 10000;
  std::uint64_t seed = 0;
};

/// The scores of one set of images against one reference.
struct scores {
  std::string name;
  index_t n = 0;
  double fd = 0;
  std::optional<double> accuracy;
  double precision = 0, recall = 0;

  json to_json() const {
    return {{"samples", name},
            {"n", n},
            {"fd", fd},
            {"accuracy", accuracy ? json(*accuracy) : json(nullptr)},  // null: the file has no labels
            {"precision", precision},
            {"recall", recall}};
  }
};

/// The reference's features and their Gaussian.
struct reference_features {
  eval::embedding features;
  eval::gaussian_stats stats;
  eval::feature_matrix matrix;
};

reference_features make_reference(const net_type& net, const eval::image_set& images, const std::string& what) {
  reference_features r;
  r.features = eval::embed(net, images);
  r.stats = eval::fit_gaussian(r.features.matrix(), what + " features");
  r.matrix = eval::to_feature_matrix(r.features.matrix(), what + " features");
  return r;
}

scores score(const net_type& net, const eval::image_set& images, const std::string& name,
             const reference_features& ref, index_t k) {
  PROMOE_CHECK(images.n > k && images.n >= 2, name, ": ", images.n, " images; the scores need more than ", k,
               " (k of the k-NN balls) and at least 2");
  const eval::embedding e = eval::embed(net, images);
  scores s;
  s.name = name;
  s.n = images.n;
  s.fd = eval::frechet_distance(eval::fit_gaussian(e.matrix(), name + " features"), ref.stats);
  if (images.has_labels()) s.accuracy = eval::accuracy(e.predictions, images.labels);
  const auto pr = eval::precision_recall(ref.matrix, eval::to_feature_matrix(e.matrix(), name + " features"), k);
  s.precision = pr.precision;
  s.recall = pr.recall;
  return s;
}

/// n distinct indices of [0, total) drawn from the seed (all of them, in order, when n >= total).
std::vector<index_t> random_subset(index_t total, index_t n, std::uint64_t seed, std::uint64_t stream) {
  std::vector<index_t> idx(static_cast<std::size_t>(total));
  for (index_t i = 0; i < total; ++i) idx[static_cast<std::size_t>(i)] = i;
  if (n >= total) return idx;
  const rng gen(seed);
  for (index_t i = 0; i < n; ++i) {  // partial Fisher-Yates
    const auto j = i + static_cast<index_t>(gen.uniform(stream, static_cast<std::uint64_t>(i)) *
                                            static_cast<double>(total - i));
    std::swap(idx[static_cast<std::size_t>(i)], idx[static_cast<std::size_t>(std::min(j, total - 1))]);
  }
  idx.resize(static_cast<std::size_t>(n));
  std::sort(idx.begin(), idx.end());
  return idx;
}

void train(net_type& net, const options& o, const eval::image_set& test) {
  std::printf("training the classifier (784-512-256-10 MLP, GELU) on %s/train-*, %lld epochs, seed %llu\n",
              o.data.c_str(), static_cast<long long>(o.epochs), static_cast<unsigned long long>(o.seed));
  const auto t_load = clock_type::now();
  const eval::image_set train_set =
      eval::from_labelled_images(io::load_fashion_mnist(true, o.data), fmnist_shape, o.data + " (training set)");
  std::printf("  %lld training images loaded in %.1f s\n", static_cast<long long>(train_set.n), seconds_since(t_load));
  eval::feature_net_training t;
  t.epochs = o.epochs;
  t.seed = o.seed;
  const auto t0 = clock_type::now();
  const bool tty = isatty(1);
  eval::train_feature_net(net, train_set, t, [&](const eval::training_progress& p) {
    if (p.end_of_epoch || (tty && p.step % 20 == 0) || (!tty && p.step % 200 == 0)) {
      std::printf("%s  epoch %lld/%lld  step %5lld/%lld  loss %.4f  train accuracy %.4f  lr %.2e  %.0f s%s",
                  tty ? "\r" : "", static_cast<long long>(p.epoch + 1), static_cast<long long>(p.epochs),
                  static_cast<long long>(p.step), static_cast<long long>(p.steps), p.loss, p.accuracy, p.lr,
                  seconds_since(t0), tty && !p.end_of_epoch ? "" : "\n");
      std::fflush(stdout);
    }
  });
  const double train_s = seconds_since(t0);
  const double acc = eval::accuracy(eval::embed(net, test).predictions, test.labels);
  std::printf("classifier trained in %.1f s: test accuracy %.4f\n", train_s, acc);
  if (acc < 0.88)
    std::fprintf(stderr, "promoe-evaluate: warning: the classifier's test accuracy %.4f is below 0.88\n", acc);
  eval::save_feature_net(o.classifier, net,
                         {{"test_accuracy", std::to_string(acc)},
                          {"epochs", std::to_string(o.epochs)},
                          {"seed", std::to_string(o.seed)},
                          {"train_seconds", std::to_string(train_s)}});
  std::printf("saved %s\n", o.classifier.c_str());
}

void print_table(const std::vector<scores>& rows) {
  std::size_t w = 7;
  for (const auto& r : rows) w = std::max(w, r.name.size());
  std::printf("\n%-*s %7s %10s %9s %10s %8s\n", static_cast<int>(w), "samples", "n", "FD", "accuracy", "precision",
              "recall");
  for (const auto& r : rows) {
    char acc[32] = "      n/a";
    if (r.accuracy) std::snprintf(acc, sizeof acc, "%9.4f", *r.accuracy);
    std::printf("%-*s %7lld %10.4f %s %10.4f %8.4f\n", static_cast<int>(w), r.name.c_str(),
                static_cast<long long>(r.n), r.fd, acc, r.precision, r.recall);
  }
}

int run(const options& o) {
  PROMOE_CHECK(!o.samples.empty() || o.floor, "nothing to evaluate: give --samples S.npz and/or --floor");
  PROMOE_CHECK(o.epochs >= 1, "--epochs must be >= 1, got ", o.epochs);
  PROMOE_CHECK(o.k >= 1, "--k must be >= 1, got ", o.k);
  PROMOE_CHECK(o.floor_n >= 2, "--floor-n must be >= 2, got ", o.floor_n);
  // Read the samples first: a bad file fails before anything slow runs.
  const auto check_count = [&](const eval::image_set& s, const std::string& what) {
    PROMOE_CHECK(s.n > o.k && s.n >= 2, what, ": ", s.n, " images; the scores need more than ", o.k,
                 " (k of the k-NN balls) and at least 2");
  };
  std::optional<eval::image_set> samples;
  if (!o.samples.empty()) {
    samples = eval::read_samples_npz(o.samples, fmnist_shape, fmnist_classes);
    check_count(*samples, o.samples);
  }
  std::optional<eval::image_set> reference;
  if (!o.reference.empty()) {
    PROMOE_CHECK(!o.samples.empty(), "--reference needs --samples (the floor always uses the training set)");
    reference = eval::read_samples_npz(o.reference, fmnist_shape, fmnist_classes);
    check_count(*reference, o.reference);
  }

  const eval::image_set test =
      eval::from_labelled_images(io::load_fashion_mnist(false, o.data), fmnist_shape, o.data + " (test set)");

  net_type net(eval::feature_net_config{}, rng{o.seed});
  const bool have_file = fs::exists(o.classifier);
  if (o.train_classifier || !have_file) {
    if (!o.train_classifier) std::printf("no classifier at %s: training one\n", o.classifier.c_str());
    train(net, o, test);
  } else {
    const auto info = eval::load_feature_net(o.classifier, net);
    const auto it = info.extra.find("test_accuracy");
    std::printf("loaded classifier %s (test accuracy when trained: %s)\n", o.classifier.c_str(),
                it == info.extra.end() ? "not recorded" : it->second.c_str());
  }

  // Real test-set features: the default reference, and the classifier's accuracy.
  const auto t_feat = clock_type::now();
  const reference_features test_ref = make_reference(net, test, "test-set");
  const double test_accuracy = eval::accuracy(test_ref.features.predictions, test.labels);
  std::printf("classifier test accuracy %.4f (%lld test images, features in %.1f s)\n", test_accuracy,
              static_cast<long long>(test.n), seconds_since(t_feat));

  std::vector<scores> rows;
  json out;
  out["classifier"] = o.classifier;
  out["classifier_test_accuracy"] = test_accuracy;
  out["k"] = o.k;
  if (samples) {
    const auto t0 = clock_type::now();
    std::optional<reference_features> custom;
    if (reference) custom = make_reference(net, *reference, o.reference);
    const reference_features& ref = custom ? *custom : test_ref;
    rows.push_back(score(net, *samples, o.samples, ref, o.k));
    const json s = rows.back().to_json();
    for (const auto& [key, value] : s.items()) out[key] = value;
    out["reference"] = reference ? o.reference : o.data + " (test set, " + std::to_string(test.n) + " images)";
    std::printf("scored %s against %s in %.1f s\n", o.samples.c_str(),
                reference ? o.reference.c_str() : "the test set", seconds_since(t0));
  }
  if (o.floor) {
    // The real test images (or floor_n of them) against as many random training images:
    // the scores of a generator that reproduces the data distribution.
    const auto t0 = clock_type::now();
    const eval::image_set train_set =
        eval::from_labelled_images(io::load_fashion_mnist(true, o.data), fmnist_shape, o.data + " (training set)");
    const eval::image_set train_ref =
        eval::select(train_set, random_subset(train_set.n, test.n, o.seed, /*stream*/ 0x464C52ull));
    const reference_features ref = make_reference(net, train_ref, "training-set");
    const eval::image_set floor_samples = eval::select(test, random_subset(test.n, o.floor_n, o.seed, 0x464C53ull));
    rows.push_back(score(net, floor_samples, "floor: test vs train", ref, o.k));
    json f = rows.back().to_json();
    f["reference"] = o.data + " (training set, " + std::to_string(train_ref.n) + " random images)";
    out["floor"] = f;
    std::printf("floor (%lld test images against %lld training images) in %.1f s\n",
                static_cast<long long>(floor_samples.n), static_cast<long long>(train_ref.n), seconds_since(t0));
  }
  print_table(rows);
  if (!o.json_out.empty()) {
    const std::string text = out.dump(2) + "\n";
    io::write_file_atomically(o.json_out, "promoe-evaluate", std::as_bytes(std::span<const char>(text)));
    std::printf("wrote %s\n", o.json_out.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"promoe-evaluate: FD, class accuracy, precision and recall of Fashion-MNIST samples"};
  options o;
  cli.add_option("--samples", o.samples, "samples .npz: arr_0 uint8 [N, 28, 28, 1] (as sample_dit writes), labels [N]");
  cli.add_option("--classifier", o.classifier,
                 "feature classifier checkpoint; trained on the training set and saved there when missing")
      ->capture_default_str();
  cli.add_option("--data", o.data, "folder with Fashion-MNIST's {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
      ->capture_default_str();
  cli.add_option("--reference", o.reference,
                 "reference .npz (same format as --samples) instead of the Fashion-MNIST test set");
  cli.add_flag("--train-classifier", o.train_classifier, "train the classifier even if the file exists (overwrites it)");
  cli.add_option("--epochs", o.epochs, "classifier training epochs")->capture_default_str();
  cli.add_option("--seed", o.seed, "classifier initialisation and data order; the floor's random subsets")
      ->capture_default_str();
  cli.add_option("--k", o.k, "nearest neighbours of precision / recall")->capture_default_str();
  cli.add_flag("--floor", o.floor, "also score the real test set against real training images");
  cli.add_option("--floor-n", o.floor_n, "test images scored by --floor (a random subset when below 10000)")
      ->capture_default_str();
  cli.add_option("--json", o.json_out, "write the numbers to this JSON file");
  CLI11_PARSE(cli, argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "promoe-evaluate: %s\n", e.what());
    return 1;
  }
}
