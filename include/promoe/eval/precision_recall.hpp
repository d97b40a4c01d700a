// SPDX-License-Identifier: Apache-2.0
/// \file precision_recall.hpp
/// \brief eval::precision_recall: improved precision and recall of a generative model
/// (Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative
/// Models", NeurIPS 2019) from feature vectors, by brute force in double.
///
/// Each point of a set gets a ball whose radius is the distance to its k-th nearest neighbour
/// among the OTHER points of its set (the point itself does not count; a duplicate of it
/// does). A query is inside the manifold of a set when it lies inside (distance <= radius)
/// the ball of at least one of the set's points. Then
///  - precision = fraction of fake points inside the manifold of the real points,
///  - recall    = fraction of real points inside the manifold of the fake points.
///
/// Squared distances come from |q|^2 + |r|^2 - 2 q.r over blocks of queries (one GEMM per
/// block, blocks spread over the OpenMP threads); they are exact for small integer
/// coordinates, so hand-made test sets with points on a ball's boundary behave as written.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../backend/cpu.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace promoe::eval {

/// Host feature vectors as rows, in double.
using feature_matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// The rows of `features` ([N, D] in host memory, float or double) as a feature_matrix;
/// every value must be finite (`what` names them in errors).
template <class T>
feature_matrix to_feature_matrix(const_matrix_view<T> features, const std::string& what = "features") {
  feature_matrix m(features.rows, features.cols);
  for (index_t r = 0; r < features.rows; ++r)
    for (index_t c = 0; c < features.cols; ++c) {
      const double v = static_cast<double>(features.data[r * features.ld + c]);
      PROMOE_CHECK(std::isfinite(v), what, " [", r, ", ", c, "] is not finite (", v, ")");
      m(r, c) = v;
    }
  return m;
}

namespace detail {

/// Queries per block of the pairwise distances.
inline constexpr index_t pr_block_rows = 64;

/// For each block of query rows, d2 = squared distances [rows, refs.rows()] (clamped at 0),
/// then visit(first_row, d2). Blocks run as parallel tasks; visit must be thread-safe across
/// blocks (it writes only its own rows' results).
template <class Visit>
void for_each_distance_block(const feature_matrix& queries, const feature_matrix& refs, Visit&& visit) {
  const index_t nq = queries.rows(), nr = refs.rows();
  const Eigen::VectorXd ref_norms = refs.rowwise().squaredNorm();
  const index_t blocks = (nq + pr_block_rows - 1) / pr_block_rows;
  backend_traits<backend::cpu>::parallel_tasks(blocks, [&](index_t b) {
    const index_t first = b * pr_block_rows;
    const index_t rows = std::min(pr_block_rows, nq - first);
    feature_matrix d2(rows, nr);
    d2.noalias() = -2.0 * queries.middleRows(first, rows) * refs.transpose();
    for (index_t i = 0; i < rows; ++i) {
      const double qn = queries.row(first + i).squaredNorm();
      for (index_t j = 0; j < nr; ++j) d2(i, j) = std::max(d2(i, j) + qn + ref_norms(j), 0.0);
    }
    visit(first, d2);
  });
}

inline void check_features(const feature_matrix& m, const char* who, const char* what) {
  PROMOE_CHECK(m.cols() >= 1, who, ": ", what, " have no columns (shape [", m.rows(), ", ", m.cols(), "])");
  PROMOE_CHECK(m.allFinite(), who, ": ", what, " hold NaN or Inf");
}

}  // namespace detail

/// For every row of `points`, the SQUARED distance to its k-th nearest neighbour among the
/// other rows (k >= 1; needs more than k rows).
inline std::vector<double> knn_squared_radii(const feature_matrix& points, index_t k) {
  detail::check_features(points, "knn_squared_radii", "points");
  PROMOE_CHECK(k >= 1, "knn_squared_radii: k must be >= 1, got ", k);
  PROMOE_CHECK(points.rows() > k, "knn_squared_radii: the k-th nearest neighbour (k = ", k, ") needs more than ", k,
               " points, got ", points.rows());
  std::vector<double> radii(static_cast<std::size_t>(points.rows()));
  detail::for_each_distance_block(points, points, [&](index_t first, feature_matrix& d2) {
    std::vector<double> row;
    for (index_t i = 0; i < d2.rows(); ++i) {
      row.assign(d2.row(i).data(), d2.row(i).data() + d2.cols());
      row[static_cast<std::size_t>(first + i)] = std::numeric_limits<double>::infinity();  // not itself
      std::nth_element(row.begin(), row.begin() + (k - 1), row.end());
      radii[static_cast<std::size_t>(first + i)] = row[static_cast<std::size_t>(k - 1)];
    }
  });
  return radii;
}

/// Fraction of the rows of `queries` that lie inside (squared distance <= squared radius) the
/// ball of at least one row of `refs`; squared_radii[j] belongs to refs row j.
inline double manifold_coverage(const feature_matrix& refs, const std::vector<double>& squared_radii,
                                const feature_matrix& queries) {
  detail::check_features(refs, "manifold_coverage", "reference features");
  detail::check_features(queries, "manifold_coverage", "query features");
  PROMOE_CHECK(refs.cols() == queries.cols(), "manifold_coverage: reference features have ", refs.cols(),
               " columns, the queries ", queries.cols());
  PROMOE_CHECK(static_cast<index_t>(squared_radii.size()) == refs.rows(), "manifold_coverage: ",
               squared_radii.size(), " radii for ", refs.rows(), " reference points");
  PROMOE_CHECK(queries.rows() >= 1, "manifold_coverage: no queries");
  std::vector<char> inside(static_cast<std::size_t>(queries.rows()), 0);
  detail::for_each_distance_block(queries, refs, [&](index_t first, feature_matrix& d2) {
    for (index_t i = 0; i < d2.rows(); ++i) {
      char in = 0;
      for (index_t j = 0; j < d2.cols() && !in; ++j) in = d2(i, j) <= squared_radii[static_cast<std::size_t>(j)];
      inside[static_cast<std::size_t>(first + i)] = in;
    }
  });
  index_t count = 0;
  for (const char c : inside) count += c;
  return static_cast<double>(count) / static_cast<double>(queries.rows());
}

struct precision_recall_result {
  double precision = 0;  ///< fraction of fake points inside the real manifold
  double recall = 0;     ///< fraction of real points inside the fake manifold
};

/// Improved precision and recall with k nearest neighbours (the paper uses k = 3); real and
/// fake are [N, D] feature rows, each with more than k rows.
inline precision_recall_result precision_recall(const feature_matrix& real, const feature_matrix& fake,
                                                index_t k = 3) {
  detail::check_features(real, "precision_recall", "real features");
  detail::check_features(fake, "precision_recall", "fake features");
  PROMOE_CHECK(real.cols() == fake.cols(), "precision_recall: real features have ", real.cols(),
               " columns, fake features ", fake.cols());
  PROMOE_CHECK(k >= 1, "precision_recall: k must be >= 1, got ", k);
  PROMOE_CHECK(real.rows() > k && fake.rows() > k, "precision_recall: with k = ", k, " both sets need more than ", k,
               " points, got ", real.rows(), " real and ", fake.rows(), " fake");
  precision_recall_result r;
  r.precision = manifold_coverage(real, knn_squared_radii(real, k), fake);
  r.recall = manifold_coverage(fake, knn_squared_radii(fake, k), real);
  return r;
}

/// The same from [N, D] host views (float or double).
template <class T>
precision_recall_result precision_recall(const_matrix_view<T> real, const_matrix_view<T> fake, index_t k = 3) {
  return precision_recall(to_feature_matrix(real, "precision_recall: real features"),
                          to_feature_matrix(fake, "precision_recall: fake features"), k);
}

}  // namespace promoe::eval
