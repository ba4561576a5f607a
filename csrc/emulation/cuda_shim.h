#pragma once
// What the device code of csrc/cuda/step_kernels.cuh needs from CUDA, for a host C++ compiler: the
// kernels then run on the CPU, in the test suite (csrc/emulation/emulated_ops.cpp).
//
// [note: emulated blocks]
// run_grid(blocks, threads, body) runs body once per emulated thread of every block. The blocks run
// one after another; the threads of a block run as fibers on the calling thread, in thread order,
// each until it reaches __syncthreads() or returns: when every live thread of the block has done
// so, the next phase starts. So __shared__ variables can be statics (one block runs at a time), an
// emulated thread sees what the threads before the barrier wrote, and every run is the same run.
// threadIdx, blockIdx, blockDim and gridDim are thread-locals set before each fiber resumes.

#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static thread_local

namespace fusedlr::emulation {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

}  // namespace fusedlr::emulation

inline thread_local fusedlr::emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fusedlr::emulation {

class Block;
inline thread_local Block* current_block = nullptr;

// The threads of one block as fibers ([note: emulated blocks]).
class Block {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;  // the kernels' arguments are up to 30 KB, by value

  // Runs body on `threads` fibers to completion.
  void run(unsigned int threads, const std::function<void()>& body) {
    while (fibers_.size() < threads) fibers_.push_back(std::make_unique<Fiber>());
    body_ = &body;
    for (unsigned int t = 0; t < threads; ++t) {
      Fiber& f = *fibers_[t];
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Block::start, 0);
    }
    current_block = this;
    for (bool live = true; live;) {  // one phase: every live thread to its next barrier or its end
      live = false;
      for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = *fibers_[t];
        if (f.done) continue;
        threadIdx.x = t;
        running_ = &f;
        swapcontext(&scheduler_, &f.context);
        live = live || !f.done;
      }
    }
    current_block = nullptr;
    running_ = nullptr;
  }

  // __syncthreads(): back to the scheduler until every thread has arrived.
  void barrier() { swapcontext(&running_->context, &scheduler_); }

 private:
  struct Fiber {
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    ucontext_t context;
    bool done = false;
  };

  static void start() {
    Block& block = *current_block;
    (*block.body_)();
    block.running_->done = true;  // uc_link returns to the scheduler
  }

  std::vector<std::unique_ptr<Fiber>> fibers_;
  const std::function<void()>* body_ = nullptr;
  Fiber* running_ = nullptr;
  ucontext_t scheduler_;
};

// Runs body(), the kernel with its arguments, on a grid of blocks x threads.
inline void run_grid(unsigned int blocks, unsigned int threads, const std::function<void()>& body) {
  static thread_local Block block;
  gridDim.x = blocks;
  blockDim.x = threads;
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    block.run(threads, body);
  }
}

}  // namespace fusedlr::emulation

inline void __syncthreads() {
  if (fusedlr::emulation::current_block == nullptr) std::abort();  // outside a kernel
  fusedlr::emulation::current_block->barrier();
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
