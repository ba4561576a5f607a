#pragma once
// [note: instruction sets]
// The CPU element loops are compiled for AVX-512, AVX2 and baseline x86-64. One version runs per
// process: the best the CPU has, or the one FUSEDLR_CPU_ISA names (avx512, avx2 or default), so
// that a test run can force each version on any machine that has it. Every version rounds the
// same (setup.py compiles without contraction into fused multiply-adds), which the suite checks
// by running the same steps under each (tests/test_cpu_isa.py).
//
// A loop is a lambda marked FUSEDLR_LOOP_INLINE, run by run_for_cpu_isa: it is inlined into one
// wrapper function per instruction set (marked with GCC's target attribute), where the compiler
// vectorizes it for that set. A wrapper is called only when the CPU has its instructions.

#include <string>

namespace fusedlr {

enum class CpuIsa : int { kDefault, kAvx2, kAvx512 };

// The version the loops run, chosen on the first call; raises if FUSEDLR_CPU_ISA names an unknown
// version or one this CPU lacks.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// The versions this CPU can run, from baseline up.
std::string cpu_isas_supported();

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDLR_CPU_VERSIONS 1
#define FUSEDLR_LOOP_INLINE __attribute__((always_inline))

// AVX-512 (F, BW, DQ, VL) with 512-bit vectors. gcc's default for AVX-512 targets is 256-bit
// vectors; a former variant of F alone at that width ran the bfloat16-state loops a quarter slower.
template <typename Loop>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512"), noinline)) void run_avx512(
    const Loop& loop) {
  loop();
}

// AVX-512 on 256-bit vectors, for the loops of 8-bit state ([note: 8-bit state]): with 512-bit
// vectors gcc vectorizes their updates at 16 lanes but their codecs at 8, and the loop took 1.45x
// the time it takes with 256-bit vectors throughout (AdamW, float32 parameters, one thread).
template <typename Loop>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=256"), noinline)) void run_avx512_256(
    const Loop& loop) {
  loop();
}

template <typename Loop>
__attribute__((target("avx2"), noinline)) void run_avx2(const Loop& loop) {
  loop();
}

template <typename Loop>
__attribute__((noinline)) void run_default(const Loop& loop) {
  loop();
}

// kNarrow: AVX-512 with 256-bit vectors (run_avx512_256).
template <bool kNarrow = false, typename Loop>
inline void run_for_cpu_isa(const Loop& loop) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      if constexpr (kNarrow) return run_avx512_256(loop);
      return run_avx512(loop);
    case CpuIsa::kAvx2:
      return run_avx2(loop);
    case CpuIsa::kDefault:
      return run_default(loop);
  }
}
#else
#define FUSEDLR_CPU_VERSIONS 0
#define FUSEDLR_LOOP_INLINE

template <bool kNarrow = false, typename Loop>
inline void run_for_cpu_isa(const Loop& loop) {
  loop();
}
#endif

}  // namespace fusedlr
