// Memory for packed optimizer state (fusedlr/_state.py, [note: packed state]).
//
// [note: huge pages]
// A step streams every state buffer once, and on 4 KiB pages that means a TLB miss every 4 KiB of
// each stream; under virtualization each miss walks two page tables. Where transparent huge pages
// are given only to memory that asks for them (/sys/kernel/mm/transparent_hugepage/enabled says
// "madvise", a common default), a large packed buffer asks: the 2 MiB-aligned pages inside it are
// marked with madvise(MADV_HUGEPAGE) before zero_() first writes them, so that the writes fault in
// huge pages where the allocation is freshly mapped. Where the kernel gives no huge pages, or the
// memory was in use before, nothing changes.

#include "state_memory.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedlr {

at::Tensor packed_state_buffer(int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "fusedlr: a packed state buffer of ", numel, " elements");
  at::Tensor buffer = at::empty({numel}, at::TensorOptions().dtype(dtype));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(buffer.nbytes());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (first < last) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: failure changes nothing
  }
#endif
  return buffer.zero_();
}

}  // namespace fusedlr
