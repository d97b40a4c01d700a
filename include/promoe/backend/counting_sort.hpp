// SPDX-License-Identifier: Apache-2.0
/// \file counting_sort.hpp
/// \brief The host's group_by_key: a stable counting sort of small integer keys, with no
/// scratch memory (the backends whose memory the host reads use it).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../core/config.hpp"

namespace promoe::detail {

/// Stable counting sort: order lists the indices i with 0 <= keys[i] < num_keys grouped by
/// key (ascending), in index order within a key; offsets[num_keys + 1] delimit the groups.
template <class Key>  // std::int32_t (expert ids), std::int64_t (class labels)
void host_group_by_key(const Key* keys, index_t n, index_t num_keys, index_t* order, index_t* offsets) {
  const auto valid = [&](index_t i) { return keys[i] >= 0 && keys[i] < num_keys; };
  std::fill(offsets, offsets + num_keys + 1, index_t{0});
  for (index_t i = 0; i < n; ++i)
    if (valid(i)) ++offsets[keys[i] + 1];
  for (index_t e = 0; e < num_keys; ++e) offsets[e + 1] += offsets[e];
  // offsets[k] serves as the cursor of group k; afterwards it holds the end of group k,
  // so one shift restores the starts. No scratch memory.
  for (index_t i = 0; i < n; ++i)
    if (valid(i)) order[offsets[keys[i]]++] = i;
  for (index_t e = num_keys; e > 0; --e) offsets[e] = offsets[e - 1];
  offsets[0] = 0;
}

}  // namespace promoe::detail
