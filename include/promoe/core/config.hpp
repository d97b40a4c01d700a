// SPDX-License-Identifier: Apache-2.0
/// \file config.hpp
/// \brief Compiler configuration: host/device annotation and the index type.
#pragma once

#include <cstdint>

// Two separate questions, as Eigen separates EIGEN_GPUCC from EIGEN_GPU_COMPILE_PHASE:
// "is a CUDA compiler in use" (annotations are needed) and "is this the device pass"
// (host-only code must be skipped).
#if defined(__CUDACC__)
#define PROMOE_CUDA_COMPILER 1
#define PROMOE_HOST_DEVICE __host__ __device__
#else
#define PROMOE_CUDA_COMPILER 0
#define PROMOE_HOST_DEVICE
#endif

#if defined(__CUDA_ARCH__)
#define PROMOE_DEVICE_PASS 1
#else
#define PROMOE_DEVICE_PASS 0
#endif

#define PROMOE_VERSION_MAJOR 0
#define PROMOE_VERSION_MINOR 1
#define PROMOE_VERSION_PATCH 0

namespace promoe {

/// Signed index for sizes and offsets: row counts of token matrices exceed 2^31 only in
/// theory, but products like tokens x hidden do not, so 64 bits everywhere.
using index_t = std::int64_t;

}  // namespace promoe
