#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fusedlr {
namespace {

bool cpu_has(CpuIsa isa) {
#if FUSEDLR_CPU_VERSIONS
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2");
    case CpuIsa::kDefault:
      return true;
  }
  return false;
#else
  return isa == CpuIsa::kDefault;
#endif
}

CpuIsa choose_cpu_isa() {
  const char* forced = std::getenv("FUSEDLR_CPU_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2}) {
      if (cpu_has(isa)) return isa;
    }
    return CpuIsa::kDefault;
  }
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(forced, cpu_isa_name(isa)) == 0) {
      TORCH_CHECK(cpu_has(isa), "FUSEDLR_CPU_ISA=", forced, ": this CPU cannot run the ", forced,
                  " version of fusedlr's loops (it can run: ", cpu_isas_supported(), ")");
      return isa;
    }
  }
  TORCH_CHECK(false, "FUSEDLR_CPU_ISA=", forced, " is not a version of fusedlr's CPU loops: use default, avx2 or ",
              "avx512 (this CPU can run: ", cpu_isas_supported(), "), or leave it unset for the best this CPU has");
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kDefault:
      return "default";
  }
  return "?";
}

std::string cpu_isas_supported() {
  std::string names;
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (cpu_has(isa)) names += std::string(names.empty() ? "" : ", ") + cpu_isa_name(isa);
  }
  return names;
}

CpuIsa cpu_isa() {
  static const CpuIsa chosen = choose_cpu_isa();  // a raising choice is retried on the next call
  return chosen;
}

}  // namespace fusedlr
