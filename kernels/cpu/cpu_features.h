// The instruction sets this process's kernels may use: what the processor has (detected
// at run time, never assumed at build time), narrowed by the environment variable
// EPIC_CPU_ISA so that every path can be run, and tested, on any host that has it.
#pragma once

#include <string>

namespace epic::cpu {

// The kernels' ladder, each rung a superset of the one before on every host seen so far.
enum class Isa : int {
  kPlain = 0,       // portable C++
  kAvx2 = 1,        // AVX2 + FMA
  kAvx512 = 2,      // AVX-512 F, BW, VL
  kAvx512Vnni = 3,  // + VNNI (int8 dot products)
  kAvx512Bf16 = 4,  // + AVX512_BF16 (BF16 dot products)
  kAmx = 5,         // + AMX tiles with BF16 (and the OS lets this process use them)
};

// "plain", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx".
const char* IsaName(Isa isa);

// The best rung the processor (and OS) offers, detected once.
Isa DetectedIsa();

// What the kernels use: DetectedIsa(), or EPIC_CPU_ISA when that names a narrower rung
// (a wider one than the host has is ignored, with a note on stderr, once).
Isa ActiveIsa();

// Whether the kernels may use ISA (ActiveIsa() is it or above).
inline bool Has(Isa isa) { return static_cast<int>(ActiveIsa()) >= static_cast<int>(isa); }

// AVX-VNNI (256-bit vpdpbusd): beside the ladder, as hosts with AVX-512 may lack it.
// Whether the processor has it and the kernels may use AVX2 (Has(Isa::kAvx2)).
bool HasAvxVnni();

// The AMD Zen generation of a processor with AVX-512 when the kernels may use it: 4 (it
// runs 512-bit operations as two 256-bit halves: one 512-bit FMA and one 512-bit load a
// cycle) or 5 (family 1Ah and later: full-width, two of each a cycle); 0 elsewhere.
// Kernels whose best form differs there ask (matmul.cc's BF16 products, the fast
// precision's attention).
int AmdZenAvx512();

// For tests: every rung this host offers, narrowest first.
std::string AvailableIsas();

}  // namespace epic::cpu
