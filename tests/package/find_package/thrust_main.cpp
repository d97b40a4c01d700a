// SPDX-License-Identifier: Apache-2.0
/// \file thrust_main.cpp
/// \brief promoe::thrust from an installed promoe brings Thrust with the expected system.
#include <promoe/backend/thrust.hpp>
#include <promoe/promoe.hpp>

#include <thrust/device_vector.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/reduce.h>

#include <cstdint>
#include <iostream>

#if !defined(PROMOE_HAS_THRUST) || PROMOE_HAS_THRUST != 1
#error "promoe::thrust must define PROMOE_HAS_THRUST=1"
#endif
static_assert(THRUST_DEVICE_SYSTEM == PROMOE_EXPECT_THRUST_SYSTEM,
              "promoe::thrust has the wrong Thrust device system");

int main() {
  thrust::device_vector<std::int64_t> v(thrust::counting_iterator<std::int64_t>(1),
                                        thrust::counting_iterator<std::int64_t>(1001));
  const std::int64_t sum = thrust::reduce(v.begin(), v.end());
  std::cout << "thrust device system " << THRUST_DEVICE_SYSTEM << ": sum 1..1000 = " << sum
            << '\n';
  return sum == 500500 ? 0 : 1;
}
