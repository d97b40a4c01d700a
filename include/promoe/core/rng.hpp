// SPDX-License-Identifier: Apache-2.0
/// \file rng.hpp
/// \brief Counter-based random numbers (Philox4x32-10): value i of stream s under a seed is a
/// pure function of (seed, s, i), so every backend and thread count draws the same numbers.
#pragma once

#include <cmath>
#include <cstdint>

#include "config.hpp"

namespace promoe {

/// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
struct philox4x32 {
  struct block {
    std::uint32_t v[4];
  };

  PROMOE_HOST_DEVICE static block generate(std::uint64_t key, std::uint64_t counter_hi,
                                           std::uint64_t counter_lo) {
    std::uint32_t k0 = static_cast<std::uint32_t>(key);
    std::uint32_t k1 = static_cast<std::uint32_t>(key >> 32);
    block c{{static_cast<std::uint32_t>(counter_lo), static_cast<std::uint32_t>(counter_lo >> 32),
             static_cast<std::uint32_t>(counter_hi), static_cast<std::uint32_t>(counter_hi >> 32)}};
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c.v[0];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c.v[2];
      const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      c = block{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return c;
  }
};

/// A seed plus a stream counter. Each tensor (or each use) takes a fresh stream with
/// next_stream(); element i of that stream is uniform(stream, i) / normal(stream, i).
class rng {
 public:
  explicit rng(std::uint64_t seed = 0) : seed_(seed) {}

  std::uint64_t seed() const { return seed_; }
  std::uint64_t next_stream() { return stream_++; }
  std::uint64_t streams_used() const { return stream_; }
  void set_streams_used(std::uint64_t s) { stream_ = s; }

  /// Uniform in [0, 1) with 53 random bits.
  PROMOE_HOST_DEVICE static double uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
    const auto b = philox4x32::generate(seed, stream, i);
    const std::uint64_t bits = (std::uint64_t{b.v[0]} << 21) ^ (std::uint64_t{b.v[1]} >> 11);
    return static_cast<double>(bits & ((std::uint64_t{1} << 53) - 1)) * 0x1.0p-53;
  }

  /// Standard normal by Box-Muller on two 53-bit uniforms of the same counter.
  PROMOE_HOST_DEVICE static double normal(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
    const auto b = philox4x32::generate(seed, stream, i);
    const std::uint64_t x = (std::uint64_t{b.v[0]} << 21) ^ (std::uint64_t{b.v[1]} >> 11);
    const std::uint64_t y = (std::uint64_t{b.v[2]} << 21) ^ (std::uint64_t{b.v[3]} >> 11);
    const double mask = static_cast<double>((std::uint64_t{1} << 53) - 1);
    const double u1 = (static_cast<double>(x & ((std::uint64_t{1} << 53) - 1)) + 1.0) / (mask + 2.0);  // (0, 1)
    const double u2 = static_cast<double>(y & ((std::uint64_t{1} << 53) - 1)) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

  double uniform(std::uint64_t stream, std::uint64_t i) const { return uniform(seed_, stream, i); }
  double normal(std::uint64_t stream, std::uint64_t i) const { return normal(seed_, stream, i); }

 private:
  std::uint64_t seed_;
  std::uint64_t stream_ = 0;
};

}  // namespace promoe
