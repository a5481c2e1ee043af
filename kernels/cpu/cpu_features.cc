#include "kernels/cpu/cpu_features.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace epic::cpu {
namespace {

constexpr const char* kNames[] = {"plain", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"};

// Linux hands out AMX tile state only to a process that asks (arch_prctl). Some guests
// accept the request yet never grant the state (tile instructions then fault): only a
// permission that reads back as granted counts.
bool AmxPermitted() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr int kArchGetXcompPerm = 0x1024;
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0) return false;
  return (granted >> kXfeatureXtiledata) & 1;
#else
  return false;
#endif
}

Isa Detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kPlain;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx2;
  }
  if (!__builtin_cpu_supports("avx512vnni")) return Isa::kAvx512;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Vnni;
  // CPUID leaf 7: AMX-BF16 is EDX bit 22, AMX-TILE bit 24 (not every compiler's
  // __builtin_cpu_supports knows them).
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool amx = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
  if (!amx || !AmxPermitted()) return Isa::kAvx512Bf16;
  return Isa::kAmx;
#else
  return Isa::kPlain;
#endif
}

Isa Active() {
  const Isa detected = DetectedIsa();
  const char* forced = std::getenv("EPIC_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return detected;
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    if (std::strcmp(forced, kNames[i]) != 0) continue;
    if (i > static_cast<int>(detected)) {
      std::fprintf(stderr, "epic: EPIC_CPU_ISA=%s is more than this processor offers; using %s\n", forced,
                   IsaName(detected));
      return detected;
    }
    return static_cast<Isa>(i);
  }
  std::fprintf(stderr, "epic: EPIC_CPU_ISA=%s is none of plain, avx2, avx512, avx512_vnni, avx512_bf16, amx; using %s\n",
               forced, IsaName(detected));
  return detected;
}

}  // namespace

const char* IsaName(Isa isa) { return kNames[static_cast<int>(isa)]; }

Isa DetectedIsa() {
  static const Isa isa = Detect();
  return isa;
}

Isa ActiveIsa() {
  static const Isa isa = Active();
  return isa;
}

bool HasAvxVnni() {
  static const bool detected = [] {
#if defined(__x86_64__)
    // CPUID leaf 7, subleaf 1: AVX-VNNI is EAX bit 4 (not every compiler's
    // __builtin_cpu_supports knows it).
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1);
#else
    return false;
#endif
  }();
  return detected && Has(Isa::kAvx2);
}

int AmdZenAvx512() {
  static const int detected = [] {
#if defined(__x86_64__)
    // Vendor "AuthenticAMD" (leaf 0: EBX, EDX, ECX); family (leaf 1) the base 0Fh plus
    // the extended: 19h is Zen 3 (no AVX-512) and Zen 4, 1Ah Zen 5.
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541 || d != 0x69746e65 || c != 0x444d4163) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned base = a >> 8 & 0xf, extended = a >> 20 & 0xff;
    if (base != 0xf) return 0;
    return base + extended == 0x19 ? 4 : base + extended >= 0x1a ? 5 : 0;
#else
    return 0;
#endif
  }();
  return Has(Isa::kAvx512) ? detected : 0;
}

std::string AvailableIsas() {
  std::string out;
  for (int i = 0; i <= static_cast<int>(DetectedIsa()); ++i) out += std::string(i ? " " : "") + kNames[i];
  return out;
}

}  // namespace epic::cpu
