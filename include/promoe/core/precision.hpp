// SPDX-License-Identifier: Apache-2.0
/// \file precision.hpp
/// \brief matmul_precision: how float32 GEMMs treat their operands, process-wide, as PyTorch's
/// torch.set_float32_matmul_precision does.
///
///  - highest: float32 operands, float32 accumulation.
///  - bf16:    both operands rounded to bfloat16 (round to nearest, ties to even), products
///             accumulated in float32. On a GPU this is cuBLAS's bf16 tensor-core path
///             (CUBLAS_COMPUTE_32F_FAST_16BF); on the CPU the same numbers, from copies of the
///             operands rounded to bf16 before an ordinary float32 GEMM.
///
/// Only the GEMMs change: tensors, parameters, the optimizer's master weights and every other
/// operation stay float32 (the mixed-precision recipe of bf16 training), and float64 GEMMs are
/// never affected.
#pragma once

#include <atomic>
#include <string_view>

#include "bf16.hpp"
#include "config.hpp"
#include "error.hpp"

namespace promoe {

enum class matmul_precision { highest, bf16 };

namespace detail {
inline std::atomic<matmul_precision>& matmul_precision_state() {
  static std::atomic<matmul_precision> state{matmul_precision::highest};
  return state;
}
}  // namespace detail

/// Sets the precision of every float32 GEMM that starts after the call.
inline void set_matmul_precision(matmul_precision p) { detail::matmul_precision_state().store(p); }
inline matmul_precision get_matmul_precision() { return detail::matmul_precision_state().load(); }

/// "highest" or "bf16" (a command-line flag's value).
inline matmul_precision parse_matmul_precision(std::string_view name) {
  if (name == "highest") return matmul_precision::highest;
  if (name == "bf16") return matmul_precision::bf16;
  fail("matmul precision '", name, "' is not one of: highest, bf16");
}
inline const char* to_string(matmul_precision p) { return p == matmul_precision::bf16 ? "bf16" : "highest"; }

/// Sets a precision for the lifetime of the scope and restores the previous one after.
class matmul_precision_scope {
 public:
  explicit matmul_precision_scope(matmul_precision p) : previous_(get_matmul_precision()) { set_matmul_precision(p); }
  ~matmul_precision_scope() { set_matmul_precision(previous_); }
  matmul_precision_scope(const matmul_precision_scope&) = delete;
  matmul_precision_scope& operator=(const matmul_precision_scope&) = delete;

 private:
  matmul_precision previous_;
};

/// x rounded to the nearest bfloat16 (ties to even), as a float: the upper 16 bits of x's
/// pattern after rounding. NaN stays NaN (quiet), infinities stay, values beyond the largest
/// bf16 round to infinity.
inline float round_to_bf16(float x) { return static_cast<float>(bf16(x)); }

}  // namespace promoe
