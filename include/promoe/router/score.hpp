// SPDX-License-Identifier: Apache-2.0
/// \file score.hpp
/// \brief Score functions that turn router logits into gate scores, and their backward.
///
/// A runtime choice rather than a template parameter: it costs one branch per token, keeps
/// instantiation counts (and compile times) down, and lets a config file pick it.
#pragma once

#include <cmath>
#include <ostream>
#include <string>

#include "../core/bf16.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"

namespace promoe {

enum class score_fn : int {
  softmax = 0,  ///< over the experts of a token (DiT-MoE, expert choice)
  sigmoid = 1,  ///< per expert, independent
  identity = 2  ///< the logit itself (ProMoE's cosine, Expert Race)
};

inline const char* to_string(score_fn f) {
  switch (f) {
    case score_fn::softmax: return "softmax";
    case score_fn::sigmoid: return "sigmoid";
    case score_fn::identity: return "identity";
  }
  return "?";
}
inline std::ostream& operator<<(std::ostream& os, score_fn f) { return os << to_string(f); }

/// "softmax" | "sigmoid" | "identity" -> score_fn; anything else is an error naming the choices.
inline score_fn parse_score_fn(const std::string& s) {
  if (s == "softmax") return score_fn::softmax;
  if (s == "sigmoid") return score_fn::sigmoid;
  if (s == "identity") return score_fn::identity;
  fail("unknown score function '", s, "' (expected softmax, sigmoid or identity)");
}

namespace score {

/// p[0..n) = f(z[0..n)).
template <class T>
PROMOE_HOST_DEVICE void apply(score_fn f, const T* z, T* p, index_t n) {
  using std::exp;
  if (f == score_fn::softmax) {
    T m = z[0];
    for (index_t e = 1; e < n; ++e) m = z[e] > m ? z[e] : m;
    compute_t<T> s = 0;
    for (index_t e = 0; e < n; ++e) {
      p[e] = exp(z[e] - m);
      s += p[e];
    }
    for (index_t e = 0; e < n; ++e) p[e] /= s;
  } else if (f == score_fn::sigmoid) {
    for (index_t e = 0; e < n; ++e) p[e] = T(1) / (T(1) + exp(-z[e]));
  } else {
    for (index_t e = 0; e < n; ++e) p[e] = z[e];
  }
}

/// dz[0..n) (+)= d(scores)/d(logits)^T ds for scores p = f(z): the backward of apply().
template <class T>
PROMOE_HOST_DEVICE void backward(score_fn f, const T* p, const T* ds, T* dz, index_t n, bool accumulate) {
  using C = compute_t<T>;
  C weighted = 0;
  if (f == score_fn::softmax)
    for (index_t e = 0; e < n; ++e) weighted += ds[e] * p[e];
  for (index_t e = 0; e < n; ++e) {
    C g;
    if (f == score_fn::softmax) g = p[e] * (ds[e] - weighted);
    else if (f == score_fn::sigmoid) g = ds[e] * p[e] * (C(1) - p[e]);
    else g = ds[e];
    dz[e] = accumulate ? T(dz[e] + g) : T(g);
  }
}

/// Rows of scores: p[t, :] = f(z[t, :]).
template <class T>
struct apply_rows_functor {
  score_fn fn;
  const T* z;  // [rows, n]
  T* p;        // [rows, n]
  index_t n;
  PROMOE_HOST_DEVICE void operator()(index_t t) const { apply(fn, z + t * n, p + t * n, n); }
};

/// Rows of the backward: dz[t, :] = extra[t, :] (or 0) + backward of f at p[t, :] for ds[t, :].
template <class T>
struct backward_rows_functor {
  score_fn fn;
  const T* p;      // [rows, n]
  const T* ds;     // [rows, n]
  const T* extra;  // [rows, n] or null
  T* dz;           // [rows, n]
  index_t n;
  PROMOE_HOST_DEVICE void operator()(index_t t) const {
    for (index_t e = 0; e < n; ++e) dz[t * n + e] = extra ? extra[t * n + e] : T(0);
    backward(fn, p + t * n, ds + t * n, dz + t * n, n, true);
  }
};

}  // namespace score
}  // namespace promoe
