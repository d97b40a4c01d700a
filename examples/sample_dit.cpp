// SPDX-License-Identifier: Apache-2.0
// sample_dit: loads a train_dit checkpoint (EMA weights by default), samples N images for
// the given or cycling labels with classifier-free guidance, and writes them as an .npz
// (arr_0 uint8 [N, H, W, C] as the ADM evaluator reads it, plus labels) and a PNG grid next
// to it; or, for models of latents, the raw samples as a .safetensors file.
#include <cstdio>
#include <filesystem>

#include <CLI/CLI.hpp>

#include <promoe/io/npz.hpp>
#include <promoe/io/safetensors.hpp>

#include "dit_app.hpp"

using namespace app;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App cli{"sample_dit: sample images from a train_dit checkpoint"};
  std::string checkpoint, out = "samples.npz";
  index_t num_samples = 64, steps = 50, columns = 8;
  double cfg_scale = 2.0;
  std::uint64_t seed = 0;
  std::vector<std::int64_t> labels;
  bool raw_weights = false;
  std::string device = default_device, matmul_precision = "highest";
  cli.add_option("--checkpoint", checkpoint, "checkpoint written by train_dit")->required();
  cli.add_option("--num-samples", num_samples, "images to sample")->capture_default_str();
  cli.add_option("--cfg-scale", cfg_scale, "classifier-free guidance scale (>= 1)")->capture_default_str();
  cli.add_option("--steps", steps, "sampler steps (Euler for flow, DDIM for DDPM)")->capture_default_str();
  cli.add_option("--seed", seed, "seed of the sampling noise")->capture_default_str();
  cli.add_option("--labels", labels, "class labels to sample (cycled); default: 0, 1, ..., num_classes - 1 cycled");
  cli.add_option("--columns", columns, "columns of the PNG grid")->capture_default_str();
  cli.add_option("--out", out,
                 "output .npz (uint8 images; the grid goes next to it as .png) or .safetensors (the raw samples "
                 "[N,C,H,W] float32 and labels, e.g. latents for a decoder)")
      ->capture_default_str();
  cli.add_option("--device", device, "where to sample: cpu, thrust or cuda (as train_dit)")->capture_default_str();
  cli.add_option("--matmul-precision", matmul_precision, "float32 GEMMs: highest or bf16 (as train_dit)")
      ->capture_default_str();
  cli.add_flag("--raw-weights", raw_weights, "use the trained weights instead of their EMA");
  CLI11_PARSE(cli, argc, argv);
  try {
    PROMOE_CHECK(num_samples >= 1, "--num-samples must be >= 1, got ", num_samples);
    PROMOE_CHECK(steps >= 1, "--steps must be >= 1, got ", steps);
    set_matmul_precision(parse_matmul_precision(matmul_precision));
    const auto info = io::read_checkpoint_info(checkpoint);
    const run_config r = run_config::from_json(info.config, checkpoint);
    r.validate();
    with_model_type(r, device, [&]<class Model>() {
      using B = typename Model::backend_type;
      const auto d = dit::preset(r.preset);
      Model model(d, model_moe_config<Model>(r, d), rng{r.seed});
      // the trained weights and buffers, then (by default) the EMA weights over the parameters
      io::load_checkpoint<T, B>(checkpoint, {{"model", model_tensors(model)}}, info.config);
      if (!raw_weights) io::load_checkpoint<T, B>(checkpoint, {{"ema", model.parameters()}}, info.config);
      std::vector<std::int64_t> want(static_cast<std::size_t>(num_samples));
      for (index_t i = 0; i < num_samples; ++i)
        want[i] = labels.empty() ? i % d.num_classes : labels[static_cast<std::size_t>(i) % labels.size()];
      for (std::int64_t l : want)
        PROMOE_CHECK(l >= 0 && l < d.num_classes, "--labels: ", l, " is outside 0..", d.num_classes - 1);
      const auto x = sample(model, r, want, cfg_scale, steps, seed);
      const index_t s = d.input_size, c = d.in_channels;
      const char* weights = raw_weights ? "trained" : "EMA";
      if (fs::path(out).extension() == ".safetensors") {
        io::safetensors_writer w;
        w.add("samples", {num_samples, c, s, s}, x);
        w.add("labels", {num_samples}, want);
        w.write(out);
        std::printf("wrote %s (%lld samples, %s weights, step %llu)\n", out.c_str(),
                    static_cast<long long>(num_samples), weights, static_cast<unsigned long long>(info.step));
        return;
      }
      const auto images = nhwc_bytes(x, num_samples, c, s, s);
      io::write_samples_npz(out, images, num_samples, s, s, c, want);
      const auto grid = io::image_grid(images, num_samples, s, s, c, columns, 2, 255);
      const auto png = fs::path(out).replace_extension(".png").string();
      io::write_png(png, grid);
      std::printf("wrote %s and %s (%lld samples, %s weights, step %llu)\n", out.c_str(), png.c_str(),
                  static_cast<long long>(num_samples), weights,
                  static_cast<unsigned long long>(info.step));
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sample_dit: %s\n", e.what());
    return 1;
  }
  return 0;
}
