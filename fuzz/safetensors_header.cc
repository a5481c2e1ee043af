// A safetensors file from the input, opened as the checkpoint loader opens every shard:
// the header must be refused or describe tensors that lie inside the file, back to back.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "worker/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = epic::fuzz::ScratchDir() / "model.safetensors";
  epic::fuzz::WriteFile(path, std::string_view(reinterpret_cast<const char*>(data), size));
  auto file = epic::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  int64_t total = 0;
  unsigned checksum = 0;
  for (const auto& [name, view] : (*file)->tensors()) {
    EPIC_FUZZ_CHECK(view.name == name);
    EPIC_FUZZ_CHECK(view.nbytes >= 0 && view.nbytes == view.numel() * epic::DTypeSize(view.dtype));
    total += view.nbytes;
    EPIC_FUZZ_CHECK(total <= (*file)->size_bytes() - 8);
    // Every byte a tensor claims is read: a view past the mapping faults here.
    for (int64_t i = 0; i < view.nbytes; ++i) checksum += static_cast<unsigned>(view.data[i]);
    if (view.dtype == epic::DType::kF32 || view.dtype == epic::DType::kBF16 || view.dtype == epic::DType::kF16) {
      if (view.numel() > 0) checksum += view.FloatAt(view.numel() - 1) == 0.0f;
    }
    (void)view.ShapeString();
  }
  (void)checksum;
  return 0;
}
