// The emulated device's controls, for the Python module and the tests.
#pragma once

#include <cstdint>

namespace seqfuse::emu {

// The order in which blocks start, and in which the threads of a block are resumed
// between synchronisation points (Random: a fresh order on every pass).
enum class Order { Forward, Reverse, Random };

struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0;
};

// Sets the schedule of every later launch. `resident` blocks run interleaved at their
// synchronisation points (1: one block at a time); `seed` draws the random orders.
void configure(Order threads, Order blocks, int resident, uint64_t seed);
Stats stats();

}  // namespace seqfuse::emu
