// SPDX-License-Identifier: Apache-2.0
/// \file main.cpp
/// \brief promoe added with add_subdirectory is usable: its umbrella header compiles and promoe::error works.
#include <promoe/promoe.hpp>

#include <iostream>
#include <string>

int main() {
  try {
    PROMOE_CHECK(1 + 1 == 3, "consumer: expected ", 3, ", got ", 1 + 1);
  } catch (const promoe::error& e) {
    std::cout << "caught promoe::error: " << e.what() << '\n';
    return std::string(e.what()) == "consumer: expected 3, got 2" ? 0 : 1;
  }
  std::cerr << "PROMOE_CHECK did not throw\n";
  return 1;
}
