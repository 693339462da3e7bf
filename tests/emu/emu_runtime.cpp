// The fiber scheduler behind emu_runtime.h (see there for what it emulates and checks).
#include "emu_runtime.h"

#include <sys/mman.h>

#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

// Context switches. On x86-64 a few instructions save the callee-saved registers and the
// floating-point control words on the old stack and load them from the new one (glibc's
// swapcontext makes a system call per switch, which made the emulation several times slower);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
.pushsection .text
.globl emu_switch_stack
.type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack, .-emu_switch_stack
.popsection
)");

namespace emu {
namespace {

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
// A fresh context that enters `start` (which must never return) on the stack [base, base+bytes):
// the frame emu_switch_stack pops, then start's address for its ret, then a null return
// address, so that start begins with the stack alignment of a called function.
inline void make_context(Context& c, char* base, size_t bytes, void (*start)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + bytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                    // start's return address (never used)
  *--sp = reinterpret_cast<uint64_t>(start);    // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;        // rbp, rbx, r12-r15
  *--sp = uint64_t(0x037f) << 32 | 0x1f80;      // x87 control word, MXCSR: the defaults
  c.sp = sp;
}
#else
}  // namespace emu
#include <ucontext.h>
namespace emu {
namespace {
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* base, size_t bytes, void (*start)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, start, 0);
}
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

enum class State { Ready, Barrier, Warp, Grid, Done };

struct Fiber {
  Context context;
  uint3 tid{0, 0, 0};
  State state = State::Ready;
  int kind = 0, arg = 0;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  Context scheduler;
  uint3 block{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::vector<unsigned char> shared;
  std::set<const void*> shared_seen;  // static shared variables met in this block
  // Cooperative launches: the block's first thread stack, and its static shared variables' bytes
  // while other blocks run (they share the variables' one instance).
  bool cooperative = false;
  size_t stack_base = 0;
  std::map<const void*, std::vector<unsigned char>> saved;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  std::exception_ptr error;  // thrown inside a thread; rethrown by the scheduler
};

BlockRun* g_run = nullptr;

std::map<const void*, int>& max_dynamic_shared() {
  static std::map<const void*, int> limits;
  return limits;
}

// Every static shared variable any block met (address, bytes): a cooperative launch saves and
// restores them as its blocks take turns.
std::map<const void*, size_t>& static_shared() {
  static std::map<const void*, size_t> vars;
  return vars;
}

// Stacks, kept across launches (untouched pages cost nothing). The first 1024 (every thread of a
// block) each lie above an inaccessible guard page, so that an overflow faults instead of
// corrupting its neighbour; the others, which only cooperative grids use (all their blocks' threads
// live at once), come 256 to a mapping without guards, to stay within the process's mapping limit.
constexpr size_t kGuarded = 1024;
// The lowest bytes of each unguarded stack hold this pattern while its fiber runs; a fiber that
// overran its stack has overwritten it (checked when the launch ends).
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xa5;

char* stack_of(size_t thread) {
  constexpr size_t kGuard = 4096, kPerMapping = 256;
  static std::vector<char*> stacks;
  while (stacks.size() <= thread) {
    if (stacks.size() < kGuarded) {
      void* p = mmap(nullptr, kStackBytes + kGuard, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: no memory for a thread stack");
      mprotect(p, kGuard, PROT_NONE);
      stacks.push_back(static_cast<char*>(p) + kGuard);
      continue;
    }
    void* p = mmap(nullptr, kStackBytes * kPerMapping, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: no memory for thread stacks");
    for (size_t k = 0; k < kPerMapping; ++k) stacks.push_back(static_cast<char*>(p) + k * kStackBytes);
  }
  return stacks[thread];
}

BlockRun& run() {
  if (g_run == nullptr || g_run->current == nullptr)
    throw std::logic_error("emulated CUDA: a device function was called outside a kernel");
  return *g_run;
}

void fiber_main() {
  BlockRun& r = *g_run;
  try {
    (*r.body)();
  } catch (...) {
    r.error = std::current_exception();
  }
  r.current->state = State::Done;
  switch_context(r.current->context, r.scheduler);  // never resumed
  std::abort();
}

// Suspends the calling fiber in `state` until the scheduler releases it.
void suspend(State state) {
  BlockRun& r = run();
  Fiber* f = r.current;
  f->state = state;
  switch_context(f->context, r.scheduler);
}

void fail(BlockRun& r, const std::string& what) {
  throw std::runtime_error("emulated CUDA, block (" + std::to_string(r.block.x) + ", " +
                           std::to_string(r.block.y) + ", " + std::to_string(r.block.z) +
                           "): " + what);
}

// Releases the warp collective of lanes [first, last) if all of them reached it; returns whether
// it did. A collective that some lanes can never reach is an error.
bool resolve_warp(BlockRun& r, size_t first, size_t last) {
  size_t waiting = 0, done = 0;
  for (size_t t = first; t < last; ++t) {
    waiting += r.fibers[t].state == State::Warp;
    done += r.fibers[t].state == State::Done;
  }
  if (waiting == 0) return false;
  if (done > 0) fail(r, "a warp collective with lanes that exited (thread " + std::to_string(first) + "+)");
  if (waiting < last - first) return false;  // the others wait at a barrier: a deadlock, unless...
  const Fiber& lead = r.fibers[first];
  const unsigned want = last - first == 32 ? kFullMask : (1u << (last - first)) - 1u;
  uint64_t any = 0;
  for (size_t t = first; t < last; ++t) {
    const Fiber& f = r.fibers[t];
    if (f.kind != lead.kind || f.mask != lead.mask)
      fail(r, "the lanes of a warp are at different collectives (thread " + std::to_string(t) + ")");
    if (f.mask != want)
      fail(r, "a warp collective whose mask does not name exactly the warp's threads");
    any |= f.in;
  }
  for (size_t t = first; t < last; ++t) {
    Fiber& f = r.fibers[t];
    if (f.kind == 0) {
      const size_t src = first + ((t - first) ^ static_cast<size_t>(f.arg));
      f.out = src < last ? r.fibers[src].in : f.in;
    } else {
      f.out = any != 0;
    }
    f.state = State::Ready;
  }
  return true;
}

bool reverse_order() {
  const char* order = std::getenv("SINKHORN_EMU_ORDER");
  return order != nullptr && std::string(order) == "reverse";
}

void start_block(BlockRun& r) {
  const size_t threads = size_t(r.block_dim.x) * r.block_dim.y * r.block_dim.z;
  r.fibers.assign(threads, Fiber{});
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = {static_cast<unsigned>(t % r.block_dim.x),
             static_cast<unsigned>((t / r.block_dim.x) % r.block_dim.y),
             static_cast<unsigned>(t / (size_t(r.block_dim.x) * r.block_dim.y))};
    char* stack = stack_of(r.stack_base + t);
    if (r.stack_base + t >= kGuarded) std::memset(stack, kCanary, kCanaryBytes);
    make_context(f.context, stack, kStackBytes, fiber_main);
  }
}

// Whether a fiber of the block overran an unguarded stack (its canary changed).
void check_canaries(BlockRun& r) {
  for (size_t t = 0; t < r.fibers.size(); ++t) {
    if (r.stack_base + t < kGuarded) continue;
    const char* stack = stack_of(r.stack_base + t);
    for (size_t k = 0; k < kCanaryBytes; ++k)
      if (static_cast<unsigned char>(stack[k]) != kCanary)
        fail(r, "thread " + std::to_string(t) + " overflowed its stack");
  }
}

// Runs the block's threads until every one has exited or waits at a grid barrier (cooperative
// launches only).
void advance_block(BlockRun& r) {
  const size_t threads = r.fibers.size();
  const bool reverse = reverse_order();
  for (;;) {
    for (size_t k = 0; k < threads; ++k) {
      Fiber& f = r.fibers[reverse ? threads - 1 - k : k];
      if (f.state != State::Ready) continue;
      r.current = &f;
      switch_context(r.scheduler, f.context);
      r.current = nullptr;
      if (r.error) std::rethrow_exception(r.error);  // the other fibers are abandoned
    }
    size_t done = 0, barrier = 0, grid = 0;
    for (const Fiber& f : r.fibers) {
      done += f.state == State::Done;
      barrier += f.state == State::Barrier;
      grid += f.state == State::Grid;
    }
    if (done + grid == threads) return;
    bool progress = false;
    for (size_t first = 0; first < threads; first += 32)
      progress |= resolve_warp(r, first, first + 32 < threads ? first + 32 : threads);
    if (progress) continue;
    if (barrier + done == threads) {
      for (Fiber& f : r.fibers)
        if (f.state == State::Barrier) f.state = State::Ready;
      continue;
    }
    if (grid > 0)
      fail(r, "deadlock: threads wait at a grid sync while others of their block wait at a "
              "__syncthreads or a warp collective");
    fail(r, "deadlock: threads wait at a warp collective that lanes of their warp reach only "
            "after a __syncthreads the waiting threads never reach");
  }
}

// The blocks of a cooperative launch, all alive at once, take turns between grid barriers: each
// runs until all its threads wait at the barrier (or exited), then the next; once every block
// is there, the barrier is released. A block's static shared variables are saved when its turn
// ends and restored when its next turn begins, so each block keeps its own, as on a GPU.
void run_cooperative(std::vector<BlockRun>& runs) {
  const bool reverse = reverse_order();
  for (;;) {
    for (size_t k = 0; k < runs.size(); ++k) {
      BlockRun& r = runs[reverse ? runs.size() - 1 - k : k];
      for (const auto& var : static_shared()) {
        const auto mine = r.saved.find(var.first);
        if (mine != r.saved.end())
          std::memcpy(const_cast<void*>(var.first), mine->second.data(), var.second);
        else
          std::memset(const_cast<void*>(var.first), 0xff, var.second);
      }
      g_run = &r;
      advance_block(r);
      for (const auto& var : static_shared()) {
        const unsigned char* at = static_cast<const unsigned char*>(var.first);
        r.saved[var.first].assign(at, at + var.second);
      }
    }
    size_t done = 0, grid = 0, threads = 0;
    for (const BlockRun& r : runs) {
      threads += r.fibers.size();
      for (const Fiber& f : r.fibers) {
        done += f.state == State::Done;
        grid += f.state == State::Grid;
      }
    }
    for (BlockRun& r : runs) check_canaries(r);
    if (done == threads) return;
    if (done > 0)
      fail(runs.front(), "deadlock: threads wait at a grid sync that exited threads never reach");
    for (BlockRun& r : runs)
      for (Fiber& f : r.fibers) f.state = State::Ready;
  }
}

}  // namespace

const uint3& thread_idx() { return run().current->tid; }
const uint3& block_idx() { return run().block; }
const dim3& block_dim() { return run().block_dim; }
const dim3& grid_dim() { return run().grid_dim; }
unsigned char* dynamic_shared() { return run().shared.data(); }

void syncthreads() { suspend(State::Barrier); }

void shared_variable(void* address, size_t bytes) {
  BlockRun& r = run();
  static_shared()[address] = bytes;
  if (r.shared_seen.insert(address).second) std::memset(address, 0xff, bytes);
}

void grid_sync() {
  if (!run().cooperative)
    throw std::runtime_error("emulated CUDA: a grid sync in a kernel not launched cooperatively");
  suspend(State::Grid);
}

uint64_t warp_collective(int kind, unsigned mask, uint64_t in, int arg) {
  Fiber* f = run().current;
  f->kind = kind;
  f->mask = mask;
  f->in = in;
  f->arg = arg;
  suspend(State::Warp);
  return f->out;
}

void set_max_dynamic_shared(const void* kernel, int bytes) { max_dynamic_shared()[kernel] = bytes; }

void check_launch_bounds(long long bound) {
  const BlockRun& r = run();
  const long long threads = 1LL * r.block_dim.x * r.block_dim.y * r.block_dim.z;
  if (threads > bound)
    throw std::runtime_error("emulated CUDA launch: a block of " + std::to_string(threads) +
                             " threads for a kernel declared __launch_bounds__(" +
                             std::to_string(bound) + ") (cudaErrorInvalidConfiguration)");
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared,
              const std::function<void()>& body, bool cooperative) {
  const size_t threads = size_t(block.x) * block.y * block.z;
  auto bad = [](const std::string& what) {
    throw std::runtime_error("emulated CUDA launch: " + what + " (cudaErrorInvalidConfiguration)");
  };
  if (threads == 0 || threads > 1024) bad("block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u ||
      grid.z > 65535u)
    bad("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
        std::to_string(grid.z) + ")");
  const auto limit = max_dynamic_shared().find(kernel);
  const size_t allowed = limit == max_dynamic_shared().end()
                             ? size_t(kDefaultDynamicShared)
                             : size_t(limit->second > kDefaultDynamicShared ? limit->second
                                                                            : kDefaultDynamicShared);
  if (shared > allowed || shared > size_t(kSharedOptin))
    bad(std::to_string(shared) + " bytes of dynamic shared memory, " + std::to_string(allowed) +
        " allowed for this kernel");
  thread_local bool launching = false;
  if (launching) throw std::logic_error("emulated CUDA: a launch inside a kernel");
  // One launch at a time (the scheduler's state and the stacks are global); the real stream
  // would serialise them too.
  static std::mutex launches;
  const std::lock_guard<std::mutex> lock(launches);
  struct Flag {
    bool& f;
    ~Flag() { f = false; }
  } flag{launching};
  launching = true;
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  auto block_at = [&](size_t t) {
    return uint3{static_cast<unsigned>(t % grid.x), static_cast<unsigned>((t / grid.x) % grid.y),
                 static_cast<unsigned>(t / (size_t(grid.x) * grid.y))};
  };
  auto prepare = [&](BlockRun& r) {
    r.block_dim = block;
    r.grid_dim = grid;
    r.body = &body;
    r.cooperative = cooperative;
  };
  try {
    if (cooperative) {
      if (blocks > size_t(kMultiprocessors) * kCooperativeBlocksPerSM)
        bad("cooperative grid of " + std::to_string(blocks) + " blocks, more than can be resident");
      std::vector<BlockRun> runs(blocks);
      for (size_t t = 0; t < blocks; ++t) {
        BlockRun& r = runs[t];
        prepare(r);
        r.block = block_at(t);
        r.stack_base = t * threads;
        r.shared.assign(shared, 0xff);
        start_block(r);
      }
      run_cooperative(runs);
    } else {
      BlockRun r;
      prepare(r);
      g_run = &r;
      // The blocks in order, or in reverse order with the threads (no block may wait for
      // another).
      const bool reverse = reverse_order();
      for (size_t k = 0; k < blocks; ++k) {
        r.block = block_at(reverse ? blocks - 1 - k : k);
        r.shared.assign(shared, 0xff);
        r.shared_seen.clear();
        start_block(r);
        advance_block(r);
      }
    }
  } catch (...) {
    g_run = nullptr;
    throw;
  }
  g_run = nullptr;
}

}  // namespace emu
