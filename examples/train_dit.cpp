// SPDX-License-Identifier: Apache-2.0
// train_dit: trains a class-conditional DiT (dense or MoE MLPs, ProMoE by default) on a real
// data set (Fashion-MNIST from its IDX files by default; image folders and latents too) with
// AdamW, EMA and gradient clipping; writes sample grids, a routing map, a loss log and
// checkpoints as it goes; --resume continues a run exactly where its last checkpoint left it.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <span>

#include <CLI/CLI.hpp>

#include <promoe/optim/clip.hpp>
#include <promoe/optim/schedule.hpp>

#include "dit_app.hpp"
#include "training_data.hpp"

using namespace app;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

namespace {

struct cli_options {
  run_config run;
  index_t steps = 3000;
  std::string data = io::fashion_mnist_default_dir();
  std::string device = default_device;
  std::string matmul_precision = "highest";
  std::string out = "out";
  index_t sample_every = 1000;
  index_t checkpoint_every = 500;
  bool resume = false;
  bool overwrite = false;
  index_t log_every = 0;  // 0: every step on a terminal, every 50 otherwise
  double cfg_scale = 2.0;
  index_t sample_steps = 30;
  index_t samples_per_class = 8;
};

/// Random streams of the training loop (distinct from the objectives' and samplers').
constexpr std::uint64_t data_stream = 0x444154ull << 40;   // batch indices, per step
constexpr std::uint64_t label_stream = 0x4C424Cull << 40;  // label dropout, per step

std::string format_duration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

/// One line of progress: on a terminal it redraws in place, otherwise a line is printed every
/// `every` steps. Cheap: formatting happens only when a line is shown.
class progress {
 public:
  progress(index_t total, index_t first, index_t every)
      : total_(total), first_(first), tty_(isatty(2)), every_(every > 0 ? every : tty_ ? 1 : 50),
        start_(clock_type::now()) {}
  bool due(index_t step) const { return step + 1 == total_ || (step + 1) % every_ == 0; }
  /// Steps per second since the start (or the resume).
  double rate(index_t step) const {
    const double elapsed = std::chrono::duration<double>(clock_type::now() - start_).count();
    return static_cast<double>(step + 1 - first_) / std::max(elapsed, 1e-9);
  }
  void show(index_t step, double loss, const std::string& aux, double images_per_step) {
    const double rate = this->rate(step);
    const int width = 24, filled = static_cast<int>(width * (step + 1) / std::max<index_t>(total_, 1));
    std::fprintf(stderr, "%sstep %6lld/%lld [%.*s%.*s] loss %.4f%s | %6.1f img/s | ETA %s%s", tty_ ? "\r" : "",
                 static_cast<long long>(step + 1), static_cast<long long>(total_), filled,
                 "########################", width - filled, "........................", loss, aux.c_str(),
                 rate * images_per_step, format_duration((total_ - step - 1) / std::max(rate, 1e-9)).c_str(),
                 tty_ ? "" : "\n");
    std::fflush(stderr);
  }
  void finish() {
    if (tty_) std::fprintf(stderr, "\n");
  }

 private:
  index_t total_, first_;
  bool tty_;
  index_t every_;
  clock_type::time_point start_;
};

/// Wall time spent in each part of the training loop, to show what the bookkeeping costs.
struct loop_timer {
  double data = 0, step = 0, report = 0, checkpoint = 0, pictures = 0;
  /// Runs f and adds its wall time (seconds) to `into`.
  template <class F>
  static decltype(auto) time(double& into, F&& f) {
    const auto t0 = clock_type::now();
    struct add {
      double& into;
      clock_type::time_point t0;
      ~add() { into += std::chrono::duration<double>(clock_type::now() - t0).count(); }
    } guard{into, t0};
    return f();
  }
  void print(index_t steps) const {
    if (steps <= 0) return;
    const double n = static_cast<double>(steps), per = 1e3 / n, base = step > 0 ? step : 1e-30;
    std::printf("time per step: %.2f ms training; data loading %.3f ms (%.2f%%), progress and log %.3f ms (%.2f%%); "
                "checkpoints %.1f s, pictures %.1f s in all\n",
                step * per, data * per, 100 * data / base, report * per, 100 * report / base, checkpoint, pictures);
  }
};

/// out/log.csv: one line per progress line (step, loss, aux loss, learning rate, images/s).
/// On --resume, lines past the checkpoint's step (a run killed after its last checkpoint)
/// are dropped so the log matches the resumed run.
class loss_log {
 public:
  loss_log(const std::string& path, index_t resumed_at) {
    std::string kept = "step,loss,aux,lr,images_per_s\n";
    if (resumed_at > 0) {
      std::ifstream in(path);
      std::string line;
      for (bool header = true; std::getline(in, line); header = false)
        if (!header && !line.empty() && std::stoll(line.substr(0, line.find(','))) <= resumed_at) kept += line + "\n";
    }
    io::write_file_atomically(path, "train_dit", std::as_bytes(std::span(kept)));
    file_ = std::fopen(path.c_str(), "a");
    PROMOE_CHECK(file_ != nullptr, "cannot open ", path, " for appending");
  }
  ~loss_log() { std::fclose(file_); }
  loss_log(const loss_log&) = delete;
  loss_log& operator=(const loss_log&) = delete;
  void add(index_t step, double loss, double aux, double lr, double images_per_s) {
    std::fprintf(file_, "%lld,%.6g,%.6g,%.6g,%.1f\n", static_cast<long long>(step), loss, aux, lr, images_per_s);
    std::fflush(file_);
  }

 private:
  std::FILE* file_;
};

/// Counts of (block, class, position, expert choice) of routed tokens, and how much of the
/// expert choice the class and the position explain.
class routing_counts {
 public:
  routing_counts(std::size_t blocks, index_t classes, index_t positions, index_t choices)
      : classes_(classes), positions_(positions), choices_(choices),
        n_(blocks * static_cast<std::size_t>(classes * positions * choices), 0) {}

  void add(std::size_t block, index_t k, index_t pos, index_t e) { ++n_[at(block, k, pos, e)]; }

  index_t most_common(std::size_t block, index_t k, index_t pos) const {
    const auto* v = &n_[at(block, k, pos, 0)];
    return static_cast<index_t>(std::max_element(v, v + choices_) - v);
  }

  struct stats {
    double entropy_bits = 0;    ///< H(E)
    double class_share = 0;     ///< I(E; class) / H(E)
    double position_share = 0;  ///< I(E; position) / H(E)
    std::vector<double> usage;  ///< P(E = e)
  };

  stats specialisation(std::size_t block) const {
    std::vector<double> pe(choices_, 0), pk(classes_, 0), pp(positions_, 0);
    std::vector<double> pke(classes_ * choices_, 0), ppe(positions_ * choices_, 0);
    double total = 0;
    for (index_t k = 0; k < classes_; ++k)
      for (index_t p = 0; p < positions_; ++p)
        for (index_t e = 0; e < choices_; ++e) {
          const double c = static_cast<double>(n_[at(block, k, p, e)]);
          pe[e] += c, pk[k] += c, pp[p] += c, pke[k * choices_ + e] += c, ppe[p * choices_ + e] += c, total += c;
        }
    stats s;
    if (total == 0) return s;
    const auto mutual = [&](const std::vector<double>& joint, const std::vector<double>& marginal) {
      double mi = 0;
      for (std::size_t a = 0; a < marginal.size(); ++a)
        for (index_t e = 0; e < choices_; ++e)
          if (const double j = joint[a * choices_ + e]; j > 0) mi += j / total * std::log2(j * total / (marginal[a] * pe[e]));
      return mi;
    };
    for (double c : pe) {
      s.usage.push_back(c / total);
      if (c > 0) s.entropy_bits -= c / total * std::log2(c / total);
    }
    if (s.entropy_bits > 0) {
      s.class_share = mutual(pke, pk) / s.entropy_bits;
      s.position_share = mutual(ppe, pp) / s.entropy_bits;
    }
    return s;
  }

 private:
  std::size_t at(std::size_t block, index_t k, index_t pos, index_t e) const {
    return ((block * static_cast<std::size_t>(classes_) + static_cast<std::size_t>(k)) * positions_ + pos) * choices_ + e;
  }
  index_t classes_, positions_, choices_;
  std::vector<index_t> n_;
};

template <class Model>
class trainer {
  using B = typename Model::backend_type;
  using T = typename Model::scalar;  ///< float, or bf16 (--dtype bf16)
  using F = compute_t<T>;            ///< float: the optimizer state, the EMA, the checkpoint's type

 public:
  trainer(const cli_options& o, const training_data& data)
      : o_(o), r_(o.run), d_(dit::preset(o.run.preset)), data_(data),
        model_(d_, model_moe_config<Model>(r_, d_), rng{r_.seed}),
        adamw_(model_.parameters(), {.lr = r_.lr}), ema_(model_.parameters(), r_.ema_decay),
        schedule_(r_.lr, r_.warmup) {}

  std::string config_text() const { return r_.to_json().dump(); }

  /// The checkpoint's float32 groups, and a bf16 model's weights (stored widened, so the
  /// checkpoint is an ordinary float32 one; AdamW's state holds the float32 master weights).
  std::vector<io::checkpoint_group<F, B>> groups() {
    if constexpr (std::is_same_v<T, F>)
      return {{"model", model_tensors(model_)}, {"ema", ema_.shadow()}, {"optim", adamw_.state()}};
    else
      return {{"ema", ema_.shadow()}, {"optim", adamw_.state()}};
  }
  std::vector<io::checkpoint_group<bf16, B>> bf16_groups() {
    if constexpr (std::is_same_v<T, F>) return {};
    else return {{"model", model_tensors(model_)}};
  }

  void save(index_t step) {
    io::checkpoint_info info;
    info.step = static_cast<std::uint64_t>(step);
    info.rng_seed = r_.seed;
    info.config = config_text();
    info.extra["optim_step"] = std::to_string(adamw_.step());
    io::save_checkpoint<F, B>(checkpoint_path(), groups(), info, bf16_groups());
  }

  index_t resume() {
    const auto info = io::load_checkpoint<F, B>(checkpoint_path(), groups(), config_text(), bf16_groups());
    adamw_.set_step(std::stoll(info.extra.at("optim_step")));
    return static_cast<index_t>(info.step);
  }

  void run() {
    std::error_code ec;
    fs::create_directories(o_.out, ec);
    PROMOE_CHECK(!ec, "--out ", o_.out, ": cannot create the folder (", ec.message(), ")");
    index_t first = 0;
    if (o_.resume) {
      first = resume();
      std::fprintf(stderr, "resumed from %s at step %lld\n", checkpoint_path().c_str(), static_cast<long long>(first));
    } else {
      PROMOE_CHECK(o_.overwrite || !fs::exists(checkpoint_path()), checkpoint_path(),
                   " exists: pass --resume to continue that run or --overwrite to start a new one over it");
    }
    checked_steps_ = first;
    io::remove_stale_temp_files(checkpoint_path());
    std::printf("model: %s, %zu parameter tensors; training %lld steps of batch %lld on %lld %s\n", r_.mlp.c_str(),
                model_.parameters().size(), static_cast<long long>(o_.steps), static_cast<long long>(r_.batch),
                static_cast<long long>(data_.size()), data_.images() ? "images" : "latents");
    loss_log log((fs::path(o_.out) / "log.csv").string(), first);
    progress bar(o_.steps, first, o_.log_every);
    loop_timer timer;
    const auto params = model_.parameters();
    for (index_t step = first; step < o_.steps; ++step) {
      timer.time(timer.data, [&] { load_batch(step); });
      timer.time(timer.step, [&] { train_step(step, params); });
      if (bar.due(step))
        timer.time(timer.report, [&] {
          // the first values read back from the device this step: the wait for it lands here
          check_gradients(step);
          const double loss = batch_.loss(), aux = aux_loss();
          const double images_per_s = bar.rate(step) * static_cast<double>(r_.batch);
          bar.show(step, loss, aux_text(aux), static_cast<double>(r_.batch));
          log.add(step + 1, loss, aux, schedule_.lr_at(step), images_per_s);
        });
      const bool last = step + 1 == o_.steps;
      if ((step + 1) % o_.checkpoint_every == 0 || last)
        timer.time(timer.checkpoint, [&] {
          check_gradients(step);
          save(step + 1);
        });
      if ((step + 1) % o_.sample_every == 0 || last)
        timer.time(timer.pictures, [&] {
          check_gradients(step);
          write_pictures(step + 1);
        });
    }
    bar.finish();
    timer.print(o_.steps - first);
  }

 private:
  std::string checkpoint_path() const { return (fs::path(o_.out) / "checkpoint.safetensors").string(); }

  /// The step's batch of training samples (a function of (seed, step)) into x0_ and labels_.
  void load_batch(index_t step) {
    const index_t n = r_.batch, chw = d_.input_size * d_.input_size * d_.in_channels;
    labels_.resize(static_cast<std::size_t>(n));
    pixels_.resize(static_cast<std::size_t>(n * chw));
    for (index_t i = 0; i < n; ++i) {
      const auto k = static_cast<index_t>(rng::uniform(r_.seed, data_stream + step, i) * static_cast<double>(data_.size()));
      labels_[i] = data_.label(k);
      data_.fill(k, pixels_.data() + i * chw);
    }
    x0_.resize({n, d_.in_channels, d_.input_size, d_.input_size});
    B_traits::copy_from_host(pixels_.data(), x0_.size(), x0_.data());
  }

  /// One optimisation step on the loaded batch; everything random is a function of (seed, step).
  /// Nothing in it reads a value back: the loss stays in batch_, the clipping record in
  /// clip_workspace_, the auxiliary losses in cache_.
  void train_step(index_t step, const std::vector<named_parameter<T>>& params) {
    const index_t n = r_.batch;
    model_.drop_labels(labels_, rng{r_.seed}, label_stream + step, dropped_);
    if (r_.objective == "flow") flow_.sample(x0_, r_.seed, step, batch_);
    else ddpm_.sample(x0_, r_.seed, step, batch_);
    out_.resize({n, d_.out_channels(), d_.input_size, d_.input_size});
    model_.forward(batch_.x_t.matrix(), batch_.t, dropped_, out_.matrix(), cache_);
    if (r_.objective == "flow") flow_.queue_loss_and_grad(out_, batch_, dout_);
    else ddpm_.queue_loss_and_grad(out_, batch_, dout_);
    model_.zero_grad();
    model_.backward(dout_.matrix(), cache_);
    optim::queue_clip_grad_norm<T, B>(params, r_.clip, clip_workspace_);
    adamw_.step(schedule_.lr_at(step));
    // EMA with a warm-up (min(decay, (1 + step) / (10 + step))): a short run's EMA is not
    // dominated by the initial weights (DiT's zero-initialised output layer).
    ema_.update(std::min(r_.ema_decay, (1.0 + static_cast<double>(step)) / (10.0 + static_cast<double>(step))));
  }

  /// Clipping counts NaN/Inf gradient norms on the device; they are read where the run reads
  /// anyway (a log line, a checkpoint, the pictures), so weights such gradients reached are
  /// never saved over the last good checkpoint or pictures.
  void check_gradients(index_t step) {
    const auto record = clip_workspace_.read_record();
    PROMOE_CHECK(record.non_finite_calls == 0, "training: ", record.non_finite_calls, " of the steps ",
                 checked_steps_ + 1, " to ", step + 1,
                 " had NaN/Inf gradients (the global gradient norm was not finite); stopping before the weights they reached"
                 " are saved");
    checked_steps_ = step + 1;
  }

  double aux_loss() const {
    if constexpr (Model::has_moe) return static_cast<double>(model_.aux_loss(cache_));
    else return 0.0;
  }
  static std::string aux_text(double aux) {
    if constexpr (!Model::has_moe) return "";
    char buf[48];
    std::snprintf(buf, sizeof buf, " aux %.4f", aux);
    return buf;
  }

  /// samples.png (EMA weights, one row per class; images only: latents need a decoder) and
  /// routing.png.
  void write_pictures(index_t step) {
    const auto params = model_.parameters();
    ema_.swap(params);
    if (data_.images()) {
      std::vector<std::int64_t> labels;
      for (index_t k = 0; k < d_.num_classes; ++k)
        for (index_t j = 0; j < o_.samples_per_class; ++j) labels.push_back(k);
      const auto x = sample(model_, r_, labels, o_.cfg_scale, o_.sample_steps, r_.seed + 1);
      const index_t n = static_cast<index_t>(labels.size()), s = d_.input_size, c = d_.in_channels;
      const auto grid = io::image_grid(nhwc_bytes(x, n, c, s, s), n, s, s, c, o_.samples_per_class, 2, 255);
      io::write_png((fs::path(o_.out) / "samples.png").string(), grid);
    }
    if constexpr (Model::has_moe) write_routing_map(step);
    ema_.swap(params);
  }

  /// Routing of noised training images (t = 500, 32 per class) through every MoE block:
  /// routing.png maps, per class (rows) and token position, the expert the first MoE block
  /// sends most of them to; routing.json says per block how much of the expert choice is
  /// explained by the class and by the position (mutual information over the choice's entropy).
  void write_routing_map(index_t step) {
    std::vector<std::size_t> moe_blocks;
    for (std::size_t b = 0; b < model_.blocks().size(); ++b)
      if (model_.blocks()[b].moe) moe_blocks.push_back(b);
    // each token's main expert: routed 0..E-1, E for the unconditional experts, E+1 for none
    const index_t g = d_.grid(), per_class = 32, scale = 8, choices = r_.experts + 2;
    routing_counts counts(moe_blocks.size(), d_.num_classes, g * g, choices);
    for (index_t k = 0; k < d_.num_classes; ++k) {
      std::vector<index_t> picks;
      for (index_t i = 0; i < data_.size() && static_cast<index_t>(picks.size()) < per_class; ++i)
        if (data_.label(i) == k) picks.push_back(i);
      const index_t m = static_cast<index_t>(picks.size()), hw = d_.input_size * d_.input_size * d_.in_channels;
      if (m == 0) continue;
      std::vector<T> px(static_cast<std::size_t>(m * hw));
      for (index_t i = 0; i < m; ++i) data_.fill(picks[i], px.data() + i * hw);
      const auto x0 = tensor<T, B>::from_host(px, {m, d_.in_channels, d_.input_size, d_.input_size});
      auto batch = flow_.sample(x0, r_.seed + 2, 0);
      std::fill(batch.t.begin(), batch.t.end(), F(500));
      tensor<T, B> out({m, d_.output_size()});
      typename Model::cache c;
      const std::vector<std::int64_t> labels(static_cast<std::size_t>(m), k);
      model_.forward(batch.x_t.matrix(), batch.t, labels, out.matrix(), c);
      for (std::size_t b = 0; b < moe_blocks.size(); ++b) {
        const auto& plan = c.blocks[moe_blocks[b]].moe.plan;
        const auto se = plan.slot_expert.to_host();
        const auto sg = plan.slot_gate.to_host();
        for (index_t t = 0; t < m * g * g; ++t) {
          index_t best = -1;
          for (index_t q = 0; q < plan.slots_per_token; ++q) {
            const index_t s = t * plan.slots_per_token + q;
            if (se[s] >= 0 && (best < 0 || sg[s] > sg[best])) best = s;
          }
          counts.add(b, k, t % (g * g), best < 0 ? r_.experts + 1 : std::min<index_t>(se[best], r_.experts));
        }
      }
    }
    static constexpr std::uint8_t palette[][3] = {{230, 25, 75},  {60, 180, 75},  {255, 225, 25}, {0, 130, 200},
                                                  {245, 130, 48}, {145, 30, 180}, {70, 240, 240}, {240, 50, 230},
                                                  {210, 245, 60}, {250, 190, 212}, {0, 128, 128}, {220, 190, 255},
                                                  {170, 110, 40}, {255, 250, 200}, {128, 0, 0},   {170, 255, 195}};
    std::vector<std::uint8_t> cells;
    for (index_t k = 0; k < d_.num_classes; ++k)
      for (index_t y = 0; y < g * scale; ++y)
        for (index_t x = 0; x < g * scale; ++x) {
          const index_t e = counts.most_common(0, k, (y / scale) * g + x / scale);
          for (int ch = 0; ch < 3; ++ch)  // routed: a colour each; unconditional: grey; none: black
            cells.push_back(e < r_.experts ? palette[e % 16][ch] : e == r_.experts ? 128 : 0);
        }
    const auto grid = io::image_grid(cells, d_.num_classes, g * scale, g * scale, 3, 1, 2, 255);
    io::write_png((fs::path(o_.out) / "routing.png").string(), grid);
    nlohmann::json blocks = nlohmann::json::array();
    for (std::size_t b = 0; b < moe_blocks.size(); ++b) {
      const auto st = counts.specialisation(b);
      blocks.push_back({{"block", moe_blocks[b]},
                        {"expert_entropy_bits", st.entropy_bits},
                        {"class_share", st.class_share},
                        {"position_share", st.position_share},
                        {"usage", st.usage}});
    }
    const nlohmann::json j = {{"step", step}, {"timestep", 500}, {"images_per_class", per_class},
                              {"choices", "routed experts 0..E-1, then unconditional, then none"},
                              {"blocks", blocks}};
    const std::string text = j.dump(1) + "\n";
    io::write_file_atomically((fs::path(o_.out) / "routing.json").string(), "routing.json",
                              std::as_bytes(std::span(text.data(), text.size())));
  }

  using B_traits = backend_traits<B>;
  const cli_options& o_;
  run_config r_;
  dit::dit_config d_;
  const training_data& data_;
  Model model_;
  optim::adamw<T, B> adamw_;
  optim::ema<T, B> ema_;
  optim::schedule schedule_;
  dit::rectified_flow flow_;
  dit::ddpm ddpm_;
  typename Model::cache cache_;
  dit::training_batch<T, B> batch_;
  tensor<T, B> x0_, out_, dout_;
  std::vector<std::int64_t> labels_, dropped_;
  optim::grad_norm_workspace<B> clip_workspace_;
  index_t checked_steps_ = 0;  ///< steps whose gradients check_gradients has seen
  std::vector<T> pixels_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"train_dit: train a class-conditional DiT (dense or MoE) on Fashion-MNIST-style data"};
  cli_options o;
  auto& r = o.run;
  cli.add_option("--preset", r.preset, "model preset: mini-28 (28x28x1), mini-32 (32x32x3), S, B, L, XL")
      ->capture_default_str();
  cli.add_option("--mlp", r.mlp, "MLP of the DiT blocks: dense, top-k, expert-choice, expert-race, promoe, promoe-no-rcl "
                 "(ProMoE without the routing contrastive loss), promoe-no-cond (without conditional routing)")
      ->capture_default_str();
  cli.add_option("--device", o.device,
                 "where to train: cpu, thrust (the build's Thrust device system: the GPU on a CUDA build, else OpenMP) "
                 "or cuda (CUDA builds)")
      ->capture_default_str();
  cli.add_option("--matmul-precision", o.matmul_precision,
                 "float32 GEMMs: highest (float32 operands) or bf16 (operands rounded to bfloat16, float32 "
                 "accumulation; tensor cores on a GPU); weights, optimizer and every other op stay float32")
      ->capture_default_str();
  cli.add_option("--dtype", r.dtype,
                 "float32, or bf16: weights, activations and gradients in bfloat16 with float32 accumulation, "
                 "float32 master weights in AdamW and a float32 EMA (the checkpoint stays float32)")
      ->capture_default_str();
  cli.add_option("--objective", r.objective, "flow (rectified flow) or ddpm")->capture_default_str();
  cli.add_option("--experts", r.experts, "routed experts per MoE block")->capture_default_str();
  cli.add_option("--steps", o.steps, "training steps")->capture_default_str();
  cli.add_option("--batch", r.batch, "images per step")->capture_default_str();
  cli.add_option("--lr", r.lr, "AdamW learning rate (after warm-up)")->capture_default_str();
  cli.add_option("--warmup", r.warmup, "linear warm-up steps")->capture_default_str();
  cli.add_option("--clip", r.clip, "gradient clipping: max global norm")->capture_default_str();
  cli.add_option("--ema-decay", r.ema_decay, "EMA decay of the weights used for sampling")->capture_default_str();
  cli.add_option("--seed", r.seed, "seed of everything random (init, data order, noise, dropout)")
      ->capture_default_str();
  cli.add_option("--data", o.data,
                 "training data: a folder of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]), "
                 "an image folder (<class>/<image>.png), or a .safetensors file of latents [N,C,H,W] and labels [N]")
      ->capture_default_str();
  cli.add_option("--out", o.out, "output folder: checkpoint.safetensors, samples.png, routing.png")
      ->capture_default_str();
  cli.add_option("--sample-every", o.sample_every, "write samples.png and routing.png every N steps")
      ->capture_default_str();
  cli.add_option("--checkpoint-every", o.checkpoint_every, "write the checkpoint every N steps")
      ->capture_default_str();
  cli.add_option("--cfg-scale", o.cfg_scale, "guidance scale of the sample grids")->capture_default_str();
  cli.add_option("--sample-steps", o.sample_steps, "sampler steps of the sample grids")->capture_default_str();
  cli.add_option("--log-every", o.log_every,
                 "progress line and log.csv every N steps (0: every step on a terminal, every 50 otherwise)")
      ->capture_default_str();
  cli.add_flag("--resume", o.resume, "continue from <out>/checkpoint.safetensors");
  cli.add_flag("--overwrite", o.overwrite, "start a new run even if <out>/checkpoint.safetensors exists");
  CLI11_PARSE(cli, argc, argv);
  try {
    r.validate();
    PROMOE_CHECK(o.steps >= 1 && o.sample_every >= 1 && o.checkpoint_every >= 1 && o.log_every >= 0,
                 "--steps, --sample-every and --checkpoint-every must be >= 1, --log-every >= 0");
    PROMOE_CHECK(!(o.resume && o.overwrite), "--resume and --overwrite exclude each other");
    set_matmul_precision(parse_matmul_precision(o.matmul_precision));
    const auto data = training_data::load(o.data, dit::preset(r.preset));
    const auto train = [&]<class Model>() {
      trainer<Model> t(o, data);
      t.run();
    };
    if (r.dtype == "bf16")
      with_model_type<bf16>(r, o.device, train);
    else
      with_model_type(r, o.device, train);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\ntrain_dit: %s\n", e.what());
    return 1;
  }
  return 0;
}
