// SPDX-License-Identifier: Apache-2.0
/// \file frechet.hpp
/// \brief eval::gaussian_stats (mean and covariance of feature vectors) and
/// eval::frechet_distance between two such Gaussians: the FD of FID, computed in double.
///
///     FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( sqrt( S1^{1/2} S2 S1^{1/2} ) )
///
/// tr sqrt(S1 S2) (the term of the usual formula) equals tr sqrt(S1^{1/2} S2 S1^{1/2}): the two
/// matrices are similar, and the second is symmetric positive semi-definite, so both square
/// roots come from Eigen's SelfAdjointEigenSolver (tiny negative eigenvalues from rounding
/// clamped to 0) instead of a general matrix square root. The covariance is the unbiased one
/// (divided by N - 1), as numpy.cov and pytorch-fid compute it.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace promoe::eval {

/// A Gaussian fitted to `count` feature vectors of dimension mean.size().
struct gaussian_stats {
  Eigen::VectorXd mean;  ///< [D]
  Eigen::MatrixXd cov;   ///< [D, D], unbiased (divided by count - 1)
  index_t count = 0;     ///< how many vectors it was fitted to

  index_t dim() const { return static_cast<index_t>(mean.size()); }
};

/// Mean and unbiased covariance of the rows of `features` ([N, D] in host memory, float or
/// double; accumulated in double). N must be at least 2 and every value finite; `what` names
/// the features in errors.
template <class T>
gaussian_stats fit_gaussian(const_matrix_view<T> features, const std::string& what = "features") {
  const index_t n = features.rows, d = features.cols;
  PROMOE_CHECK(d >= 1, "fit_gaussian: ", what, " have no columns (shape [", n, ", ", d, "])");
  PROMOE_CHECK(n >= 2, "fit_gaussian: ", what, " need at least 2 rows for a covariance, got ", n);
  Eigen::MatrixXd x(n, d);
  for (index_t r = 0; r < n; ++r)
    for (index_t c = 0; c < d; ++c) {
      const double v = static_cast<double>(features.data[r * features.ld + c]);
      PROMOE_CHECK(std::isfinite(v), "fit_gaussian: ", what, " [", r, ", ", c, "] is not finite (", v, ")");
      x(r, c) = v;
    }
  gaussian_stats s;
  s.count = n;
  s.mean = x.colwise().mean().transpose();
  x.rowwise() -= s.mean.transpose();
  s.cov = Eigen::MatrixXd::Zero(d, d);
  s.cov.selfadjointView<Eigen::Lower>().rankUpdate(x.transpose(), 1.0 / static_cast<double>(n - 1));
  s.cov.triangularView<Eigen::StrictlyUpper>() = s.cov.transpose();
  return s;
}

namespace detail {

/// sqrt(max(v_i, 0)) elementwise. A scalar loop: GCC 12 warns (-Wuninitialized, a false
/// positive inside its AVX-512 intrinsics) about Eigen's vectorised cwiseMax().cwiseSqrt().
inline Eigen::VectorXd clamped_sqrt(const Eigen::VectorXd& v) {
  Eigen::VectorXd r(v.size());
  for (Eigen::Index i = 0; i < v.size(); ++i) r[i] = v[i] > 0.0 ? std::sqrt(v[i]) : 0.0;
  return r;
}

/// The symmetric positive semi-definite square root of a symmetric matrix (negative
/// eigenvalues from rounding count as 0).
inline Eigen::MatrixXd symmetric_sqrt(const Eigen::MatrixXd& a) {
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(a);
  PROMOE_CHECK(es.info() == Eigen::Success, "frechet_distance: the eigen-decomposition did not converge");
  const Eigen::VectorXd root = clamped_sqrt(es.eigenvalues());
  return es.eigenvectors() * root.asDiagonal() * es.eigenvectors().transpose();
}

}  // namespace detail

/// tr sqrt(S1^{1/2} S2 S1^{1/2}) for symmetric positive semi-definite S1, S2.
inline double trace_sqrt_product(const Eigen::MatrixXd& s1, const Eigen::MatrixXd& s2) {
  PROMOE_CHECK(s1.rows() == s1.cols() && s2.rows() == s2.cols() && s1.rows() == s2.rows(),
               "trace_sqrt_product: covariances of shapes [", s1.rows(), ", ", s1.cols(), "] and [", s2.rows(), ", ",
               s2.cols(), "], expected two [D, D]");
  const Eigen::MatrixXd h = detail::symmetric_sqrt(s1);
  Eigen::MatrixXd m = h * s2 * h;
  m = 0.5 * (m + m.transpose());  // symmetric up to rounding; make it exactly so
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(m, Eigen::EigenvaluesOnly);
  PROMOE_CHECK(es.info() == Eigen::Success, "frechet_distance: the eigen-decomposition did not converge");
  return detail::clamped_sqrt(es.eigenvalues()).sum();
}

/// The Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov) (see the file
/// comment); a negative result from rounding (identical Gaussians) is returned as 0.
inline double frechet_distance(const gaussian_stats& a, const gaussian_stats& b) {
  PROMOE_CHECK(a.dim() >= 1 && a.dim() == b.dim() && a.cov.rows() == a.dim() && a.cov.cols() == a.dim() &&
                   b.cov.rows() == b.dim() && b.cov.cols() == b.dim(),
               "frechet_distance: statistics of dimensions ", a.dim(), " (covariance [", a.cov.rows(), ", ",
               a.cov.cols(), "]) and ", b.dim(), " (covariance [", b.cov.rows(), ", ", b.cov.cols(),
               "]), expected the same dimension D >= 1 and [D, D] covariances");
  PROMOE_CHECK(a.mean.allFinite() && b.mean.allFinite() && a.cov.allFinite() && b.cov.allFinite(),
               "frechet_distance: the statistics hold NaN or Inf");
  const double mean_term = (a.mean - b.mean).squaredNorm();
  const double fd = mean_term + a.cov.trace() + b.cov.trace() - 2.0 * trace_sqrt_product(a.cov, b.cov);
  return std::max(fd, 0.0);
}

}  // namespace promoe::eval
