// fusedlr::sum_of_squares: the sum of the squares of every element of a list of tensors, as one
// float64, for the global gradient norm of sharded parameters ([note: global norm] in
// fusedlr/distributed.py): each rank sums its local shards, one all-reduce adds the ranks' sums.
//
// On the CPU all tensors split into chunks summed in ONE parallel region (torch's foreach norm
// loops over the tensors, a region each, which costs about as much as the whole step on a model of
// many small tensors). Each chunk sums in double; the chunks' sums are added in chunk order, so the
// result does not depend on the number of threads. Elsewhere ATen's foreach norm does it.

#include <ATen/Parallel.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

namespace fusedlr {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements a task sums

template <typename scalar_t>
double chunk_sum(const scalar_t* x, int64_t n) {
  // independent accumulators: the additions of one chain do not wait on each other
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = static_cast<double>(x[i + k]);
      acc[k] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void check_inputs(const char* op, const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensor ", i, " is sparse");
    TORCH_CHECK(t.device() == device, op, ": tensor ", i, " is on ", t.device(), ", tensor 0 on ", device);
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": tensor ", i, " is ", dtype, "; float32, float64, bfloat16 and float16 are summed");
  }
}

at::Tensor sum_of_squares_cpu(const std::vector<at::Tensor>& tensors) {
  check_inputs("fusedlr.sum_of_squares", tensors);
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  struct Chunk {
    size_t tensor;
    int64_t begin, size;
  };
  std::vector<Chunk> chunks;
  for (const at::Tensor& t : tensors) {
    dense.push_back(t.contiguous());
    const int64_t n = t.numel();
    for (int64_t begin = 0; begin < n; begin += kChunk)
      chunks.push_back({dense.size() - 1, begin, std::min(kChunk, n - begin)});
  }
  std::vector<double> sums(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const at::Tensor& t = dense[chunk.tensor];
      switch (t.scalar_type()) {
        case at::kFloat: sums[c] = chunk_sum(t.const_data_ptr<float>() + chunk.begin, chunk.size); break;
        case at::kDouble: sums[c] = chunk_sum(t.const_data_ptr<double>() + chunk.begin, chunk.size); break;
        case at::kBFloat16:
          sums[c] = chunk_sum(t.const_data_ptr<c10::BFloat16>() + chunk.begin, chunk.size);
          break;
        case at::kHalf: sums[c] = chunk_sum(t.const_data_ptr<c10::Half>() + chunk.begin, chunk.size); break;
        default: break;  // refused by check_inputs
      }
    }
  });
  double total = 0;
  for (double s : sums) total += s;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor sum_of_squares_any(const std::vector<at::Tensor>& tensors) {
  check_inputs("fusedlr.sum_of_squares", tensors);
  return at::stack(at::_foreach_norm(tensors, 2, at::kDouble)).square().sum();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlr, m) {
  m.def("sum_of_squares(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedlr, CPU, m) { m.impl("sum_of_squares", &sum_of_squares_cpu); }

TORCH_LIBRARY_IMPL(fusedlr, CompositeExplicitAutograd, m) { m.impl("sum_of_squares", &sum_of_squares_any); }

}  // namespace fusedlr
