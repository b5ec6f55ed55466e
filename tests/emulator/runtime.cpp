// The emulated device's scheduler and host runtime (see cuda_emulator.h).
//
// A launch runs its blocks in a configured order (forward, reverse, random), up to
// `resident` of them interleaved at their synchronisation points. The threads of a
// block are fibers on one OS thread; a fiber runs until it reaches __syncthreads, a
// warp collective, __nanosleep or its end, and the scheduler then resumes the others
// in a configured order (forward, reverse, or a fresh random order on every pass, in
// which a warp now and then sits out several passes and falls behind the others).
// A kernel whose result depends on these orders has a race or a missing barrier.
//
// Fails loudly (an exception out of the launch, so a RuntimeError in Python) on:
// a __syncthreads reached at different call sites or after a thread of the block has
// exited; a warp collective whose lanes disagree on the mask or that a named lane
// never reaches; a spin-wait that can never be satisfied; and kernel-side errors
// (wmma misuse, too much shared memory).
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emulator.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SEQFUSE_EMU_ASAN 1
#else
#define SEQFUSE_EMU_ASAN 0
#endif

// ---- Context switch (x86-64 System V): saves the callee-saved registers on the old
// stack, stores its stack pointer in *from, and resumes the stack `to`. ----
extern "C" void seqfuse_emu_switch(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl seqfuse_emu_switch
  .hidden seqfuse_emu_switch
  .type seqfuse_emu_switch, @function
seqfuse_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size seqfuse_emu_switch, .-seqfuse_emu_switch
)");

namespace seqfuse::emu {

const Coords* g_coords = nullptr;

namespace {

constexpr size_t kStackBytes = (SEQFUSE_EMU_ASAN ? 512 : 256) * 1024;
constexpr int kMaxStaticShared = 48 * 1024;           // per block, every arch
constexpr int kMaxSharedOptin = 227 * 1024;           // per block, H100
constexpr int kDefaultDynamicShared = 48 * 1024;      // without the opt-in attribute
constexpr long kSpinPassesBeforeDeadlock = 200000;    // passes with only spinning fibers

// A fiber stack with a guard page below it, reused across blocks and launches.
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
};

class StackPool {
 public:
  Stack take() {
    if (!free_.empty()) {
      Stack s = free_.back();
      free_.pop_back();
      return s;
    }
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);  // an overflowing fiber faults instead of corrupting
    return {static_cast<char*>(p) + page, kStackBytes};
  }
  void give(Stack s) {
#if SEQFUSE_EMU_ASAN
    // An abandoned fiber leaves its frames' redzones poisoned.
    __asan_unpoison_memory_region(s.base, s.size);
#endif
    free_.push_back(s);
  }

 private:
  std::vector<Stack> free_;
};

enum class State { Ready, Barrier, Warp, Spin, Done };

struct Block;

struct Thread {
  Coords coords;
  Block* block = nullptr;
  int linear = 0, lane = 0, warp = 0;
  State state = State::Ready;
  std::source_location site;  // where it waits
  // A pending warp collective: this lane's input, arguments and result.
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  unsigned char in[16] = {}, out[16] = {};
  size_t bytes = 0;
  int arg = 0, width = 32;
  Stack stack;
  void* sp = nullptr;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

// The lanes of one warp waiting in one collective.
struct WarpGroup {
  unsigned mask = 0, arrived = 0;
  WarpOp op = WarpOp::Sync;
};

struct SharedAlloc {
  const SharedSite* site;
  void* ptr;
  size_t bytes;
};

struct Block {
  uint3 idx{};
  std::vector<Thread> threads;
  std::vector<std::vector<WarpGroup>> warps;  // pending groups per warp
  std::vector<unsigned> lanes_present;        // per warp: lanes that exist
  std::vector<unsigned> lanes_done;           // per warp: lanes that have exited
  int live = 0, at_barrier = 0, exited = 0;
  std::source_location barrier_site;  // of the threads waiting at __syncthreads
  std::vector<SharedAlloc> shared;
  std::vector<std::vector<unsigned char>> warp_scratch;
  std::vector<int> held_passes;  // per warp: passes it still sits out (random schedule)
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  unsigned char poison = 0xFF;  // the byte its shared memory starts as
};

struct Schedule {
  Order threads = Order::Forward, blocks = Order::Forward;
  int resident = 1;
  uint64_t seed = 0;
};

// ---- Global state: one launch at a time, on one OS thread. ----
std::mutex g_launch_mutex;
Schedule g_schedule;
Stats g_stats;
StackPool g_stacks;
cudaError_t g_last_error = cudaSuccess;
std::unordered_map<const void*, int> g_max_dynamic_shared;

struct Launch {
  const LaunchConfig* config = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  Thread* current = nullptr;
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  size_t dynamic_bytes = 0;
};
Launch* g_launch = nullptr;

std::string where_of(const std::source_location& w) {
  std::string file = w.file_name();
  const auto slash = file.rfind('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(w.line());
}

std::string who(const Thread& t) {
  const auto& c = t.coords;
  return "thread (" + std::to_string(c.thread_idx.x) + "," + std::to_string(c.thread_idx.y) +
         "," + std::to_string(c.thread_idx.z) + ") of block (" + std::to_string(c.block_idx.x) +
         "," + std::to_string(c.block_idx.y) + "," + std::to_string(c.block_idx.z) + ")";
}

// Switches from the running fiber back to the scheduler.
void to_scheduler(Thread& t) {
  Launch& L = *g_launch;
#if SEQFUSE_EMU_ASAN
  __sanitizer_start_switch_fiber(t.state == State::Done ? nullptr : &t.fake_stack,
                                 L.scheduler_stack_bottom, L.scheduler_stack_size);
#endif
  seqfuse_emu_switch(&t.sp, L.scheduler_sp);
#if SEQFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &L.scheduler_stack_bottom,
                                  &L.scheduler_stack_size);
#endif
}

// Records the first error of the launch and parks the fiber for good.
[[noreturn]] void fail_here(const std::string& what) {
  Launch& L = *g_launch;
  if (L.error.empty()) L.error = what;
  Thread& t = *L.current;
  t.state = State::Done;
  to_scheduler(t);
  std::abort();  // never resumed
}

Thread& running() {
  if (g_launch == nullptr || g_launch->current == nullptr) {
    std::fprintf(stderr, "seqfuse emulator: a device function ran outside a kernel\n");
    std::abort();
  }
  return *g_launch->current;
}

[[noreturn]] void fiber_main() {
  Launch& L = *g_launch;
#if SEQFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.scheduler_stack_bottom, &L.scheduler_stack_size);
#endif
  (*L.body)();
  Thread& t = running();
  Block& b = *t.block;
  t.state = State::Done;
  b.live -= 1;
  b.exited += 1;
  b.lanes_done[t.warp] |= 1u << t.lane;
  for (const Thread& o : b.threads) {
    if (o.state == State::Barrier) {
      fail_here("divergent __syncthreads: " + who(t) + " exited while " + who(o) +
                " waits at " + where_of(o.site));
    }
  }
  for (const WarpGroup& g : b.warps[t.warp]) {
    if (g.mask & (1u << t.lane)) {
      fail_here("warp collective: lane " + std::to_string(t.lane) + " (" + who(t) +
                ") exited before the collective its mask names it in");
    }
  }
  to_scheduler(t);
  std::abort();
}

void start_fiber(Thread& t) {
  t.stack = g_stacks.take();
  // Stack top: a null return address (ends backtraces), the entry as the address that
  // seqfuse_emu_switch returns to, and six zero registers for it to pop.
  auto* top = reinterpret_cast<uintptr_t*>(
      (reinterpret_cast<uintptr_t>(t.stack.base + t.stack.size) & ~uintptr_t(15)));
  top[-1] = 0;
  top[-2] = reinterpret_cast<uintptr_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  t.sp = top - 8;
}

void resume(Thread& t) {
  Launch& L = *g_launch;
  L.current = &t;
  g_coords = &t.coords;
#if SEQFUSE_EMU_ASAN
  __sanitizer_start_switch_fiber(&L.scheduler_fake_stack, t.stack.base, t.stack.size);
#endif
  seqfuse_emu_switch(&L.scheduler_sp, t.sp);
#if SEQFUSE_EMU_ASAN
  __sanitizer_finish_switch_fiber(L.scheduler_fake_stack, nullptr, nullptr);
#endif
  L.current = nullptr;
  g_coords = nullptr;
}

void free_block(Block& b) {
  for (Thread& t : b.threads) {
    if (t.stack.base) g_stacks.give(t.stack);
    t.stack = {};
  }
  for (SharedAlloc& s : b.shared) ::operator delete(s.ptr, std::align_val_t(64));
  b.shared.clear();
  if (b.dynamic) ::operator delete(b.dynamic, std::align_val_t(128));
  b.dynamic = nullptr;
}

std::unique_ptr<Block> make_block(const LaunchConfig& cfg, unsigned linear_block,
                                  unsigned char poison) {
  auto b = std::make_unique<Block>();
  b->poison = poison;
  const dim3 g = cfg.grid, d = cfg.block;
  b->idx = {linear_block % g.x, linear_block / g.x % g.y, linear_block / (g.x * g.y)};
  const int n = int(d.x * d.y * d.z);
  const int nwarps = (n + 31) / 32;
  b->threads.resize(n);
  b->warps.resize(nwarps);
  b->lanes_present.assign(nwarps, 0);
  b->lanes_done.assign(nwarps, 0);
  b->warp_scratch.resize(nwarps);
  b->held_passes.assign(nwarps, 0);
  b->live = n;
  // The launch's dynamic shared memory, at its exact size, poisoned.
  const size_t dyn = g_launch->dynamic_bytes;
  b->dynamic = ::operator new(dyn, std::align_val_t(128));
  std::memset(b->dynamic, poison, dyn);
  for (int i = 0; i < n; ++i) {
    Thread& t = b->threads[i];
    t.coords = {{unsigned(i) % d.x, unsigned(i) / d.x % d.y, unsigned(i) / (d.x * d.y)},
                b->idx, d, g};
    t.block = b.get();
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    b->lanes_present[t.warp] |= 1u << t.lane;
    start_fiber(t);
  }
  return b;
}

std::vector<unsigned> permutation(unsigned n, Order order, std::mt19937_64& rng) {
  std::vector<unsigned> p(n);
  for (unsigned i = 0; i < n; ++i) p[i] = order == Order::Reverse ? n - 1 - i : i;
  if (order == Order::Random) std::shuffle(p.begin(), p.end(), rng);
  return p;
}

// The order of the threads of a block on the next pass.
void next_pass_order(std::vector<unsigned>& order, Order kind, std::mt19937_64& rng) {
  if (kind == Order::Random) std::shuffle(order.begin(), order.end(), rng);
}

const char* order_name(Order o) {
  return o == Order::Forward ? "forward" : o == Order::Reverse ? "reverse" : "random";
}

std::string describe_stall(const std::vector<std::unique_ptr<Block>>& resident) {
  std::string s;
  for (const auto& b : resident) {
    for (const Thread& t : b->threads) {
      if (t.state == State::Done || t.state == State::Ready) continue;
      s += "\n  " + who(t) + (t.state == State::Barrier ? " at __syncthreads "
                               : t.state == State::Warp  ? " in a warp collective "
                                                         : " spinning ") +
           where_of(t.site);
      if (s.size() > 2000) return s + "\n  ...";
    }
  }
  return s;
}

// The byte a block's shared memory starts as: 0xFF (NaN in every float type), and under
// the random thread schedule 0x3F for half the blocks, a finite value in every float
// type (0.75 in float, 4.8e-4 in double). A kernel that takes non-finite values down a
// path of their own (the scan's exact replay) could turn a read of unwritten NaN into
// a right answer; finite garbage it cannot.
unsigned char poison_byte(std::mt19937_64& rng) {
  return g_schedule.threads == Order::Random && rng() % 2 == 0 ? 0x3F : 0xFF;
}

// Runs the whole grid under g_schedule; throws on the first kernel error.
void schedule_grid(const LaunchConfig& cfg) {
  const unsigned n_blocks = cfg.grid.x * cfg.grid.y * cfg.grid.z;
  const int n_threads = int(cfg.block.x * cfg.block.y * cfg.block.z);
  std::mt19937_64 rng(g_schedule.seed ^ (g_stats.launches * 0x9E3779B97F4A7C15ull));
  const std::vector<unsigned> block_order = permutation(n_blocks, g_schedule.blocks, rng);
  const unsigned resident_max = unsigned(std::max(1, g_schedule.resident));
  std::vector<std::unique_ptr<Block>> resident;
  unsigned next = 0;
  long spin_passes = 0;
  std::vector<unsigned> thread_order = permutation(unsigned(n_threads), g_schedule.threads, rng);
  std::vector<Thread*> pass;

  auto abort_launch = [&](const std::string& why) {
    for (auto& b : resident) free_block(*b);
    resident.clear();
    throw std::runtime_error(
        "seqfuse emulator: " + why + "\n  in kernel " + cfg.kernel + " <<<(" +
        std::to_string(cfg.grid.x) + "," + std::to_string(cfg.grid.y) + "," +
        std::to_string(cfg.grid.z) + "), (" + std::to_string(cfg.block.x) + "," +
        std::to_string(cfg.block.y) + "," + std::to_string(cfg.block.z) + "), " +
        std::to_string(cfg.smem) + ">>> (threads " + order_name(g_schedule.threads) +
        ", blocks " + order_name(g_schedule.blocks) + ", resident " +
        std::to_string(resident_max) + ", seed " + std::to_string(g_schedule.seed) + ")");
  };

  while (next < n_blocks || !resident.empty()) {
    while (resident.size() < resident_max && next < n_blocks) {
      resident.push_back(make_block(cfg, block_order[next++], poison_byte(rng)));
      g_stats.blocks += 1;
    }
    // The pass: every thread that can run, block by block in the thread order, or
    // under the random schedule in one random order across all resident blocks (so a
    // block may see another's writes between two lanes of one warp), where a warp also
    // falls behind now and then, as a descheduled warp would: it sits out 1 to 16
    // passes while the others run ahead past barriers and warp collectives.
    bool progress = false;
    pass.clear();
    for (auto& b : resident) {
      next_pass_order(thread_order, g_schedule.threads, rng);
      if (g_schedule.threads == Order::Random) {
        for (int& h : b->held_passes) {
          h = h > 0 ? h - 1 : rng() % 8 == 0 ? 1 + int(rng() % 16) : 0;
        }
      }
      for (unsigned i : thread_order) {
        Thread& t = b->threads[i];
        if (t.state != State::Ready && t.state != State::Spin) continue;
        if (b->held_passes[t.warp] > 0) {
          progress |= t.state == State::Ready;  // it goes on in a later pass
        } else {
          pass.push_back(&t);
        }
      }
    }
    if (g_schedule.threads == Order::Random) std::shuffle(pass.begin(), pass.end(), rng);
    for (Thread* t : pass) {
      const bool was_spinning = t->state == State::Spin;
      t->state = State::Ready;
      resume(*t);
      g_stats.switches += 1;
      if (!g_launch->error.empty()) abort_launch(g_launch->error);
      if (!(was_spinning && t->state == State::Spin)) progress = true;
    }
    for (size_t i = 0; i < resident.size();) {
      if (resident[i]->live == 0) {
        free_block(*resident[i]);
        resident.erase(resident.begin() + long(i));
        progress = true;
      } else {
        ++i;
      }
    }
    if (progress) {
      spin_passes = 0;
      continue;
    }
    bool spinning = false;
    for (auto& b : resident) {
      for (const Thread& t : b->threads) spinning |= t.state == State::Spin;
    }
    if (!spinning) abort_launch("deadlock: no thread can go on" + describe_stall(resident));
    if (++spin_passes > kSpinPassesBeforeDeadlock) {
      abort_launch("forward-progress deadlock: every live thread spins on a condition that "
                   "no running thread can satisfy" + describe_stall(resident));
    }
  }
}

cudaError_t check_config(const LaunchConfig& cfg) {
  const dim3 g = cfg.grid, d = cfg.block;
  const unsigned long long threads = 1ull * d.x * d.y * d.z;
  if (threads == 0 || threads > 1024 || d.x > 1024 || d.y > 1024 || d.z > 64) {
    return cudaErrorInvalidConfiguration;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (1ull * g.x * g.y * g.z > 0xffffffffull) return cudaErrorInvalidConfiguration;
  const auto it = g_max_dynamic_shared.find(cfg.func);
  const int limit = it == g_max_dynamic_shared.end() ? kDefaultDynamicShared : it->second;
  if (cfg.smem > size_t(limit)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

// ---- Entry points used by the device-side header ----

void run_launch(const LaunchConfig& config, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  const cudaError_t err = check_config(config);
  if (err != cudaSuccess) {
    g_last_error = err;
    return;
  }
  Launch L;
  L.config = &config;
  L.body = &body;
  L.dynamic_bytes = config.smem;
  g_launch = &L;
  try {
    schedule_grid(config);
  } catch (...) {
    g_launch = nullptr;
    throw;
  }
  g_launch = nullptr;
  g_stats.launches += 1;
}

void sync_threads(const std::source_location& where) {
  Thread& t = running();
  Block& b = *t.block;
  if (b.exited > 0) {
    fail_here("divergent __syncthreads at " + where_of(where) + ": " + who(t) +
              " arrives after other threads of its block have exited");
  }
  const std::source_location& site = b.barrier_site;
  if (b.at_barrier > 0 &&
      (site.line() != where.line() || (site.file_name() != where.file_name() &&
                                       std::strcmp(site.file_name(), where.file_name()) != 0))) {
    for (const Thread& o : b.threads) {
      if (o.state == State::Barrier) {
        fail_here("divergent __syncthreads: " + who(t) + " at " + where_of(where) + ", " +
                  who(o) + " at " + where_of(o.site));
      }
    }
  }
  if (b.at_barrier == 0) b.barrier_site = where;
  t.site = where;
  b.at_barrier += 1;
  if (b.at_barrier == b.live) {
    for (Thread& o : b.threads) {
      if (o.state == State::Barrier) o.state = State::Ready;
    }
    b.at_barrier = 0;
    t.state = State::Ready;
  } else {
    t.state = State::Barrier;
  }
  to_scheduler(t);
}

void warp_collective(WarpOp op, unsigned mask, const void* in, void* out, size_t bytes, int arg,
                     int width, const std::source_location& where) {
  Thread& t = running();
  Block& b = *t.block;
  const unsigned me = 1u << t.lane;
  auto lane_fail = [&](const std::string& what) {
    fail_here("warp collective at " + where_of(where) + ": " + who(t) + " (lane " +
              std::to_string(t.lane) + "): " + what);
  };
  if (!(mask & me)) lane_fail("the calling lane is not in its mask");
  if (mask & ~b.lanes_present[t.warp]) lane_fail("the mask names lanes that do not exist");
  if (mask & b.lanes_done[t.warp]) lane_fail("the mask names lanes that have exited");
  if (width <= 0 || width > 32 || (width & (width - 1))) lane_fail("width is not a power of 2");

  auto& groups = b.warps[t.warp];
  WarpGroup* g = nullptr;
  for (WarpGroup& x : groups) {
    if (x.mask == mask) {
      g = &x;
    } else if (x.mask & mask) {
      lane_fail("lanes disagree on the mask (waiting: " + std::to_string(x.mask) +
                ", this lane: " + std::to_string(mask) + ")");
    }
  }
  if (g == nullptr) {
    groups.push_back({mask, 0, op});
    g = &groups.back();
  } else if (g->op != op) {
    lane_fail("the lanes of the mask are in different collectives");
  }
  t.op = op;
  t.mask = mask;
  t.bytes = bytes;
  if (bytes) std::memcpy(t.in, in, bytes);
  t.arg = arg;
  t.width = width;
  t.site = where;
  g->arrived |= me;

  if (g->arrived == mask) {
    // Everyone is here: compute every lane's result, release them, drop the group.
    Thread* lanes = &b.threads[size_t(t.warp) * 32];
    unsigned ballot = 0;
    bool any = false, all = true;
    for (int l = 0; l < 32; ++l) {
      if (!(mask & (1u << l))) continue;
      const int p = *reinterpret_cast<const int*>(lanes[l].in);
      ballot |= unsigned(p != 0) << l;
      any |= p != 0;
      all &= p != 0;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(mask & (1u << l))) continue;
      Thread& x = lanes[l];
      const int base = l & ~(x.width - 1), in_seg = l - base;
      int src = l;
      switch (op) {
        case WarpOp::ShflIdx: src = base + (x.arg & (x.width - 1)); break;
        case WarpOp::ShflUp: src = in_seg >= x.arg ? l - x.arg : l; break;
        case WarpOp::ShflDown: src = in_seg + x.arg < x.width ? l + x.arg : l; break;
        case WarpOp::ShflXor: {
          const int s = l ^ x.arg;
          src = (s & ~(x.width - 1)) == base ? s : l;
          break;
        }
        case WarpOp::Ballot: std::memcpy(x.out, &ballot, sizeof(ballot)); break;
        case WarpOp::Any: {
          const unsigned v = any;
          std::memcpy(x.out, &v, sizeof(v));
          break;
        }
        case WarpOp::All: {
          const unsigned v = all;
          std::memcpy(x.out, &v, sizeof(v));
          break;
        }
        default: break;
      }
      if (op == WarpOp::ShflIdx || op == WarpOp::ShflUp || op == WarpOp::ShflDown ||
          op == WarpOp::ShflXor) {
        if (src < 0 || src >= 32 || !(mask & (1u << src))) {
          lane_fail("lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                    ", which is not in the mask");
        }
        std::memcpy(x.out, lanes[src].in, x.bytes);
      }
      if (&x != &t) x.state = State::Ready;
    }
    groups.erase(groups.begin() + (g - groups.data()));
    t.state = State::Ready;
  } else {
    t.state = State::Warp;
  }
  to_scheduler(t);
  if (out && bytes) std::memcpy(out, t.out, bytes);
}

void nanosleep_yield() {
  Thread& t = running();
  t.state = State::Spin;
  t.site = std::source_location::current();
  to_scheduler(t);
}

void fail(const char* what) { fail_here(std::string(what) + " (" + who(running()) + ")"); }

void* shared_storage(const SharedSite& site, size_t bytes, size_t align) {
  Block& b = *running().block;
  for (const SharedAlloc& s : b.shared) {
    if (s.site == &site) return s.ptr;
  }
  if (align > 64) fail_here(std::string("__shared__ ") + site.name + ": alignment above 64");
  b.static_bytes += bytes;
  if (b.static_bytes > size_t(kMaxStaticShared) ||
      b.static_bytes + g_launch->dynamic_bytes > size_t(kMaxSharedOptin)) {
    fail_here(std::string("__shared__ ") + site.name + ": the block's shared memory (" +
              std::to_string(b.static_bytes) + " static + " +
              std::to_string(g_launch->dynamic_bytes) + " dynamic bytes) exceeds the device's");
  }
  void* p = ::operator new(bytes, std::align_val_t(64));
  std::memset(p, b.poison, bytes);
  b.shared.push_back({&site, p, bytes});
  return p;
}

void* warp_scratch(size_t bytes) {
  Thread& t = running();
  auto& s = t.block->warp_scratch[t.warp];
  if (s.size() < bytes) s.assign(bytes, 0);
  return s.data();
}

void* dynamic_shared(size_t align) {
  if (align > 128) fail("extern __shared__: alignment above 128");
  return running().block->dynamic;
}

// ---- Configuration, for the Python side ----

void configure(Order threads, Order blocks, int resident, uint64_t seed) {
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_schedule = {threads, blocks, std::max(1, resident), seed};
}

Stats stats() { return g_stats; }

}  // namespace seqfuse::emu

// ---- The slice of the CUDA runtime that seqfuse's launchers call ----

using seqfuse::emu::g_last_error;

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "cudaError (emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// An H100-like device.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  seqfuse::emu::g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind,
                            cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

}  // extern "C"
