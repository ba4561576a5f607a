// Memory for packed optimizer state (fusedlr/optim.py, [note: packed state]).
//
// [note: huge pages]
// A step streams every state buffer once, and on 4 KiB pages that means a TLB miss every 4 KiB of
// each stream; under virtualization each miss walks two page tables. Where transparent huge pages
// are given only to memory that asks for them (/sys/kernel/mm/transparent_hugepage/enabled says
// "madvise", a common default), a large packed buffer asks: its 2 MiB-aligned part is marked with
// madvise(MADV_HUGEPAGE) before it is first touched, so that zeroing it faults in huge pages. Where
// the kernel gives no huge pages, nothing changes but the 2 MiB of slack.

#include "state_memory.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedlr {

at::Tensor packed_state_buffer(int64_t numel, at::ScalarType dtype) {
  constexpr int64_t kHugePage = int64_t{2} << 20;
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
  TORCH_CHECK(numel >= 0, "fusedlr: a packed state buffer of ", numel, " elements");
  const int64_t bytes = numel * itemsize;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) {
    // Memory this large is mapped fresh for the allocation: untouched until zero_() below.
    at::Tensor raw = at::empty({bytes + kHugePage}, at::TensorOptions().dtype(at::kByte));
    const auto base = reinterpret_cast<uintptr_t>(raw.data_ptr());
    const uintptr_t aligned = (base + kHugePage - 1) & ~static_cast<uintptr_t>(kHugePage - 1);
    const auto huge_bytes = static_cast<size_t>(bytes) & ~static_cast<size_t>(kHugePage - 1);
    madvise(reinterpret_cast<void*>(aligned), huge_bytes, MADV_HUGEPAGE);  // advice: failure changes nothing
    // aligned - base is a multiple of 64 (the CPU allocator's alignment), so of every itemsize
    return raw.narrow(0, static_cast<int64_t>(aligned - base), bytes).view(dtype).zero_();
  }
#endif
  return at::zeros({numel}, at::TensorOptions().dtype(dtype));
}

}  // namespace fusedlr
