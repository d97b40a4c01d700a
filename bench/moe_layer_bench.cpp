// SPDX-License-Identifier: Apache-2.0
// promoe_bench: the MoE layer's training forward and forward+backward on the CPU backend
// (float32), next to dense GEMMs of the same FLOPs through the same GEMM path
// (ops::gemm -> Eigen, BLAS under EIGEN_USE_BLAS). The ratio says how close the layer gets
// to the machine's GEMM rate; the overhead column is the time the dense GEMMs do not explain
// (router select, gather/combine, bias and activation loops, per-expert GEMM fragmentation).
//
//   promoe_bench [--tokens 1024,4096] [--reps 5]
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <promoe/promoe.hpp>

using namespace promoe;
using B = backend::cpu;
using mat = tensor<float, B>;
using clk = std::chrono::steady_clock;

namespace {

/// Median wall time (ms) of `reps` calls of f after one untimed warm-up call (which also
/// sizes the caches, so the timed calls do not allocate).
template <class F>
double median_ms(int reps, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = clk::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

mat random_matrix(index_t rows, index_t cols, std::uint64_t stream) {
  std::vector<float> h(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(rng::normal(42, stream, i));
  return mat::from_host(h, {rows, cols});
}

struct timing {
  double fwd_ms, step_ms, fwd_flop, step_flop;
};

/// Dense stand-in with the layer's GEMM shapes but no routing: one MLP pass over all
/// `rows` expert rows (routed + shared) at width i, plus the router GEMM over `tokens`.
/// Backward mirrors the library: dW2, dH, dW1, dX per MLP, dWg and dX for the router.
timing dense(index_t tokens, index_t rows, index_t d, index_t i, index_t e, int reps) {
  mat x = random_matrix(rows, d, 1), w1 = random_matrix(i, d, 2), w2 = random_matrix(d, i, 3),
      wg = random_matrix(e, d, 4), dy = random_matrix(rows, d, 5);
  mat h({rows, i}), y({rows, d}), logits({tokens, e}), dh({rows, i}), dx({rows, d}), gw1({i, d}), gw2({d, i}),
      gwg({e, d});
  const auto xt = x.cmatrix().row_block(0, tokens);
  auto fwd = [&] {
    ops::gemm<B, float>(xt, transpose::no, wg.cmatrix(), transpose::yes, logits.matrix());
    ops::gemm<B, float>(x.cmatrix(), transpose::no, w1.cmatrix(), transpose::yes, h.matrix());
    ops::gemm<B, float>(h.cmatrix(), transpose::no, w2.cmatrix(), transpose::yes, y.matrix());
  };
  auto bwd = [&] {
    ops::gemm<B, float>(dy.cmatrix(), transpose::yes, h.cmatrix(), transpose::no, gw2.matrix(), 1.f, 1.f);
    ops::gemm<B, float>(dy.cmatrix(), transpose::no, w2.cmatrix(), transpose::no, dh.matrix());
    ops::gemm<B, float>(dh.cmatrix(), transpose::yes, x.cmatrix(), transpose::no, gw1.matrix(), 1.f, 1.f);
    ops::gemm<B, float>(dh.cmatrix(), transpose::no, w1.cmatrix(), transpose::no, dx.matrix());
    // router: logits stand in for dlogits (same shape, values do not matter for timing)
    ops::gemm<B, float>(logits.cmatrix(), transpose::yes, xt, transpose::no, gwg.matrix(), 1.f, 1.f);
    ops::gemm<B, float>(logits.cmatrix(), transpose::no, wg.cmatrix(), transpose::no, dx.matrix().row_block(0, tokens),
                        1.f, 1.f);
  };
  const double f = 4.0 * rows * d * i + 2.0 * tokens * d * e;
  return {median_ms(reps, fwd), median_ms(reps, [&] { fwd(); bwd(); }), f, 3 * f};
}

/// The layer itself: training forward (with cache), then forward + backward. Also runs the
/// dense stand-in at the routed + shared row count the layer's plan actually produced.
template <class Layer>
void bench_layer(const char* name, const typename Layer::config& cfg, index_t tokens, int reps,
                 std::vector<std::pair<std::string, timing>>& out, std::vector<timing>& dense_out) {
  Layer layer(cfg, rng{7});
  typename Layer::cache c;
  mat x = random_matrix(tokens, cfg.dim, 10), dy = random_matrix(tokens, cfg.dim, 11);
  mat y({tokens, cfg.dim}), dx({tokens, cfg.dim});
  auto fwd = [&] { layer.forward(x.cmatrix(), {}, y.matrix(), c); };
  const double fwd_ms = median_ms(reps, fwd);
  const double step_ms = median_ms(reps, [&] {
    fwd();
    layer.backward(dy.cmatrix(), c, dx.matrix());
  });
  // The shared expert has the routed width here (shared_hidden = 0), so one dense width fits.
  const index_t rows = c.plan.rows() + cfg.shared_experts * tokens;
  const double f = 4.0 * rows * cfg.dim * cfg.expert_hidden + 2.0 * tokens * cfg.dim * cfg.routed_experts;
  out.push_back({name, {fwd_ms, step_ms, f, 3 * f}});
  dense_out.push_back(dense(tokens, rows, cfg.dim, cfg.expert_hidden, cfg.routed_experts, reps));
}

// (a) ProMoE-S-like: D 384, 12 routed experts of 768, 1 shared of 768, top-1 softmax.
using promoe_s = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<>, B, float>;
// (b) top-2 over 8 experts of 1536, no shared expert, load-balance loss.
using top2 = moe_layer<router::top_k, expert::mlp<act::gelu_tanh>, losses<loss::load_balance>, B, float>;

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "promoe_bench: %s\nusage: promoe_bench [--tokens N[,N...]] [--reps R]\n", msg.c_str());
  std::exit(2);
}

/// A whole-string positive integer no larger than `max`, or usage_error.
long parse_positive(std::string_view s, const char* what, long max) {
  long v = 0;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc{} || p != s.data() + s.size() || v < 1 || v > max)
    usage_error(std::string("bad ") + what + " '" + std::string(s) + "' (expected an integer in 1.." +
                std::to_string(max) + ")");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<index_t> token_counts{1024, 4096};
  int reps = 5;
  for (int a = 1; a < argc; ++a) {
    const std::string_view arg = argv[a];
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: promoe_bench [--tokens N[,N...]] [--reps R]\n");
      return 0;
    }
    if (arg != "--tokens" && arg != "--reps") usage_error("unknown argument '" + std::string(arg) + "'");
    if (a + 1 >= argc) usage_error(std::string(arg) + " needs a value");
    const std::string_view val = argv[++a];
    if (arg == "--reps") {
      reps = static_cast<int>(parse_positive(val, "--reps", 1000));
      continue;
    }
    token_counts.clear();
    for (std::size_t pos = 0;;) {  // comma-separated list; an empty item is an error
      const std::size_t comma = std::min(val.find(',', pos), val.size());
      token_counts.push_back(parse_positive(val.substr(pos, comma - pos), "token count", 1L << 20));
      if (comma == val.size()) break;
      pos = comma + 1;
    }
  }

  promoe_s::config a;
  a.dim = 384, a.routed_experts = 12, a.expert_hidden = 768, a.shared_experts = 1;
  a.router = {.k = 1, .score = score_fn::softmax, .renormalize = false};
  top2::config b;
  b.dim = 384, b.routed_experts = 8, b.expert_hidden = 1536;
  b.router = {.k = 2, .score = score_fn::softmax, .renormalize = true};

#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
#if defined(EIGEN_USE_BLAS)
  const char* gemm_path = "Eigen -> BLAS";
#else
  const char* gemm_path = "Eigen";
#endif
  std::printf("promoe_bench: cpu backend, float32, GEMM via %s, %d OpenMP thread(s), median of %d after 1 warm-up\n",
              gemm_path, threads, reps);
  std::printf("%-24s %7s %10s %9s %9s %9s\n", "case", "tokens", "ms", "GFLOP/s", "vs dense", "overhead");
  try {
    for (const index_t n : token_counts) {
      std::vector<std::pair<std::string, timing>> moe;
      std::vector<timing> ref;
      bench_layer<promoe_s>("promoe-s top1 E12+1", a, n, reps, moe, ref);
      bench_layer<top2>("top2 E8 I1536 lb", b, n, reps, moe, ref);
      for (std::size_t k = 0; k < moe.size(); ++k) {
        const timing& m = moe[k].second;
        const timing& d = ref[k];
        // ratio = MoE rate / dense rate at equal FLOPs; overhead = share of MoE time the GEMMs do not explain
        auto row = [&](const char* pass, double ms, double flop, double dense_ms, double dense_flop) {
          const double gf = flop / ms * 1e-6, dgf = dense_flop / dense_ms * 1e-6;
          std::printf("%-24s %7lld %10.2f %9.1f %8.2fx %8.0f%%\n", (moe[k].first + pass).c_str(),
                      static_cast<long long>(n), ms, gf, gf / dgf, 100.0 * (ms - dense_ms) / ms);
          std::printf("%-24s %7lld %10.2f %9.1f\n", (std::string("  dense") + pass).c_str(),
                      static_cast<long long>(n), dense_ms, dgf);
        };
        row(" fwd", m.fwd_ms, m.fwd_flop, d.fwd_ms, d.fwd_flop);
        row(" f+b", m.step_ms, m.step_flop, d.step_ms, d.step_flop);
      }
    }
  } catch (const promoe::error& e) {
    std::fprintf(stderr, "promoe_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
