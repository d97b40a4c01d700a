// SPDX-License-Identifier: Apache-2.0
/// \file reference.hpp
/// \brief Naive float64 reference of one MoE block (plain loops, no shared code with the
/// library): router, dispatch, experts, combine and auxiliary losses. Weights are read from
/// the layer by state-dict name, so the naming is checked too.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

namespace reference {

using vec = std::vector<double>;

enum class score { softmax, sigmoid, identity };
enum class kind { mlp_gelu_tanh, swiglu };

inline double gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
inline double silu(double x) { return x / (1.0 + std::exp(-x)); }

/// y[n, out] = x[n, in] W[out, in]^T (+ b)
inline vec linear(const vec& x, int n, int in, const vec& w, int out, const vec* b) {
  vec y(static_cast<std::size_t>(n) * out, 0.0);
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) {
      double s = b ? (*b)[o] : 0.0;
      for (int i = 0; i < in; ++i) s += x[t * in + i] * w[o * in + i];
      y[t * out + o] = s;
    }
  return y;
}

struct params {
  std::map<std::string, vec> tensors;
  const vec& at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw std::runtime_error("reference: missing parameter " + name);
    return it->second;
  }
};

/// One expert on rows x [n, d].
inline vec expert(const params& p, const std::string& prefix, kind k, const std::string& in_name,
                  const std::string& out_name, const vec& x, int n, int d, int hidden) {
  if (k == kind::mlp_gelu_tanh) {
    vec h = linear(x, n, d, p.at(prefix + in_name + ".weight"), hidden, &p.at(prefix + in_name + ".bias"));
    for (double& v : h) v = gelu_tanh(v);
    return linear(h, n, hidden, p.at(prefix + out_name + ".weight"), d, &p.at(prefix + out_name + ".bias"));
  }
  vec g = linear(x, n, d, p.at(prefix + "gate_proj.weight"), hidden, nullptr);
  vec u = linear(x, n, d, p.at(prefix + "up_proj.weight"), hidden, nullptr);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
  return linear(g, n, hidden, p.at(prefix + "down_proj.weight"), d, nullptr);
}

struct layer_spec {
  int dim = 0, routed = 0, hidden = 0, shared = 0, shared_hidden = 0, k = 1;
  score fn = score::softmax;
  bool renormalize = false;
  kind routed_kind = kind::mlp_gelu_tanh, shared_kind = kind::mlp_gelu_tanh;
  std::string experts = "experts", shared_prefix = "shared_expert", mlp_in = "up_proj", mlp_out = "down_proj";
  double load_balance = 0.0, z_loss = 0.0;  // weights; 0 = absent
};

struct result {
  vec y;                               // [n, d]
  std::vector<std::vector<int>> slots;  // per token the chosen experts, best first
  std::vector<std::vector<double>> gates;
  std::vector<double> margin;          // per token: k-th best score minus (k+1)-th (inf when k = E)
  double load_balance = 0, z_loss = 0;
};

inline result forward(const layer_spec& s, const params& p, const vec& x, int n) {
  const int d = s.dim, e_count = s.routed;
  result r;
  r.y.assign(static_cast<std::size_t>(n) * d, 0.0);
  const vec logits = linear(x, n, d, p.at("gate.weight"), e_count, nullptr);
  std::vector<double> count(e_count, 0.0), mean_prob(e_count, 0.0);
  double z_sum = 0;
  for (int t = 0; t < n; ++t) {
    std::vector<double> z(logits.begin() + t * e_count, logits.begin() + (t + 1) * e_count), sc(e_count), prob(e_count);
    double m = *std::max_element(z.begin(), z.end()), total = 0;
    for (int e = 0; e < e_count; ++e) total += std::exp(z[e] - m);
    for (int e = 0; e < e_count; ++e) prob[e] = std::exp(z[e] - m) / total;
    for (int e = 0; e < e_count; ++e) {
      sc[e] = s.fn == score::softmax ? prob[e] : s.fn == score::sigmoid ? 1.0 / (1.0 + std::exp(-z[e])) : z[e];
      mean_prob[e] += prob[e] / n;
    }
    const double lse = m + std::log(total);
    z_sum += lse * lse;
    // rank experts: higher score first, lower index on ties
    std::vector<int> order(e_count);
    for (int e = 0; e < e_count; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sc[a] > sc[b]; });
    std::vector<int> chosen(order.begin(), order.begin() + s.k);
    std::vector<double> g;
    double gsum = 0;
    for (int e : chosen) {
      g.push_back(sc[e]);
      gsum += sc[e];
      count[e] += 1;
    }
    if (s.renormalize)
      for (double& v : g) v /= gsum;
    r.margin.push_back(s.k < e_count ? sc[order[s.k - 1]] - sc[order[s.k]] : INFINITY);
    vec row(x.begin() + t * d, x.begin() + (t + 1) * d);
    for (int q = 0; q < s.k; ++q) {
      const vec out = expert(p, s.experts + "." + std::to_string(chosen[q]) + ".", s.routed_kind, s.mlp_in, s.mlp_out,
                             row, 1, d, s.hidden);
      for (int j = 0; j < d; ++j) r.y[t * d + j] += g[q] * out[j];
    }
    r.slots.push_back(chosen);
    r.gates.push_back(g);
  }
  for (int sh = 0; sh < s.shared; ++sh) {
    const std::string prefix = s.shared == 1 ? s.shared_prefix + "." : s.shared_prefix + "." + std::to_string(sh) + ".";
    const vec out = expert(p, prefix, s.shared_kind, s.mlp_in, s.mlp_out, x, n, d, s.shared_hidden);
    for (std::size_t i = 0; i < out.size(); ++i) r.y[i] += out[i];
  }
  if (n > 0) {
    double lb = 0;
    for (int e = 0; e < e_count; ++e) lb += count[e] / (static_cast<double>(n) * s.k) * mean_prob[e];
    r.load_balance = s.load_balance * e_count * lb;
    r.z_loss = s.z_loss * z_sum / n;
  }
  return r;
}

}  // namespace reference
