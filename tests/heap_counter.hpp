// SPDX-License-Identifier: Apache-2.0
// heap_counter: live heap bytes, their peak and the number of allocations of the whole
// process, for promoe_bench and test_allocations. heap_counter.cpp replaces the global
// operator new / delete (every form) and, with glibc, interposes malloc / free / calloc /
// realloc / the aligned variants:
// promoe's tensors live in std::vector<T, Eigen::aligned_allocator<T>>, which allocates with
// std::malloc and never calls operator new, so counting operator new alone would miss them.
// Sizes are malloc_usable_size (what the allocator handed out, a few bytes above the request).
#pragma once

#include <cstdint>

namespace heap {

/// Whether the counters see every allocation (glibc); without it they stay 0.
bool available();
/// Bytes allocated and not yet freed.
std::int64_t live_bytes();
/// Highest live_bytes() since the last reset_peak() (or the start).
std::int64_t peak_bytes();
/// Allocation calls so far (malloc family and operator new; realloc counts as one).
std::int64_t allocations();
/// Starts a new peak: peak_bytes() := live_bytes().
void reset_peak();

}  // namespace heap
