#pragma once

#include <ATen/ATen.h>

namespace fusedlr {

// A zero CPU tensor of `numel` elements for packed optimizer state, on huge pages where the kernel
// gives them on request (state_memory.cpp, [note: huge pages]).
at::Tensor packed_state_buffer(int64_t numel, at::ScalarType dtype);

}  // namespace fusedlr
