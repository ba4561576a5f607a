// The CUDA kernels run on the CPU, for the test suite (tests/cuda_emulation.py builds this file):
// the device code of cuda/step_kernels.cuh compiled as host C++ over cuda_shim.h ([note: emulated
// blocks]), planned and launched by the same host code as on a GPU (cuda/step_host.h). The ops
// are fusedlr's, declared in a library of their own, `fusedlr_emulated`, for CPU tensors.

#include "cuda_shim.h"  // first: the CUDA keywords of the device code

#include <torch/library.h>

#include <atomic>
#include <string>

#include "../cuda/step_host.h"
#include "../op_schemas.h"
#include "../optimizers.h"
#include "../step_op.h"

namespace fusedlr {
namespace {

std::atomic<int64_t> emulated_multiprocessors{2};
std::atomic<int64_t> kernels_run{0};

// Runs each kernel to its end on the calling thread (step_host.h).
class EmulatedLauncher {
 public:
  static constexpr at::DeviceType kDeviceType = at::kCPU;

  explicit EmulatedLauncher(const at::Device&) {}

  int multiprocessors() const { return static_cast<int>(emulated_multiprocessors.load()); }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int blocks, int threads, const Args&... args) const {
    TORCH_CHECK(blocks > 0 && threads > 0 && threads <= 1024, "fusedlr_emulated: a launch of ", blocks, " blocks of ",
                threads, " threads");
    emulation::run_grid(blocks, threads, [&] { kernel(args...); });
    kernels_run.fetch_add(1);
  }
};

// The multiprocessors the launches are planned for: the grids' sizes follow (step_host.h).
void set_multiprocessors(int64_t count) {
  TORCH_CHECK(count >= 1, "fusedlr_emulated.set_multiprocessors: the count must be positive, got ", count);
  emulated_multiprocessors.store(count);
}

// The kernels run so far: a test can see how many launches a step took.
int64_t kernels_launched() { return kernels_run.load(); }

// The tensors one launch of the optimizer's step takes (cuda/step_kernels.cuh, launch_capacity).
int64_t launch_capacity(const std::string& optimizer) {
  int64_t capacity = 0;
  Optimizers::for_each([&](auto tag) {
    using Optimizer = typename decltype(tag)::type;
    if (optimizer == Optimizer::kName) capacity = decltype(cuda_step::ArgsOf<Optimizer>::tensors)::capacity;
  });
  TORCH_CHECK(capacity > 0, "fusedlr_emulated.launch_capacity: no optimizer named ", optimizer);
  return capacity;
}

template <typename Optimizer>
void impl_step(torch::Library& m) {
  m.impl(step_op_name<Optimizer>().c_str(), &StepOp<Optimizer, &cuda_step::step<Optimizer, EmulatedLauncher>>::call);
}

}  // namespace

TORCH_LIBRARY(fusedlr_emulated, m) {
  define_ops(m);
  m.def("set_multiprocessors(int count) -> ()", &set_multiprocessors);
  m.def("kernels_launched() -> int", &kernels_launched);
  m.def("launch_capacity(str optimizer) -> int", &launch_capacity);
}

TORCH_LIBRARY_IMPL(fusedlr_emulated, CPU, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
  m.impl("plateau_observe_", &cuda_step::plateau_observe<EmulatedLauncher>);
  m.impl("evaluate_schedules", &cuda_step::evaluate_schedules<EmulatedLauncher>);
}

// As fusedlr's own (ops.cpp, [note: no autograd]).
TORCH_LIBRARY_IMPL(fusedlr_emulated, Autograd, m) {
  Optimizers::for_each([&](auto tag) {
    m.impl(step_op_name<typename decltype(tag)::type>().c_str(), torch::CppFunction::makeFallthrough());
  });
  m.impl("plateau_observe_", torch::CppFunction::makeFallthrough());
}

}  // namespace fusedlr
