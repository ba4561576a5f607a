// The CUDA kernels of the fusedlr ops: the kernels of step_kernels.cuh, planned and launched by
// step_host.h on the current stream ([note: multi-tensor apply], [note: counters]).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "step_host.h"

namespace fusedlr {
namespace {

int multiprocessors_of(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> counts{};
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Launches on the current stream of the device, each launch checked (step_host.h).
class CudaLauncher {
 public:
  static constexpr at::DeviceType kDeviceType = at::kCUDA;

  explicit CudaLauncher(const at::Device& device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream()), device_(device.index()) {}

  int multiprocessors() const { return multiprocessors_of(device_); }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int blocks, int threads, const Args&... args) const {
    kernel<<<blocks, threads, 0, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  c10::DeviceIndex device_;
};

}  // namespace

template <typename Optimizer>
void impl_step(torch::Library& m) {
  m.impl(step_op_name<Optimizer>().c_str(), &StepOp<Optimizer, &cuda_step::step<Optimizer, CudaLauncher>>::call);
}

TORCH_LIBRARY_IMPL(fusedlr, CUDA, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
  m.impl("plateau_observe_", &cuda_step::plateau_observe<CudaLauncher>);
  m.impl("evaluate_schedules", &cuda_step::evaluate_schedules<CudaLauncher>);
}

// As on the CPU: a sparse gradient routes the call here, and check_step_inputs refuses it.
TORCH_LIBRARY_IMPL(fusedlr, SparseCUDA, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
}

TORCH_LIBRARY_IMPL(fusedlr, SparseCsrCUDA, m) {
  Optimizers::for_each([&](auto tag) { impl_step<typename decltype(tag)::type>(m); });
}

}  // namespace fusedlr
