// config.json from the input, parsed and then used as the checkpoint loader uses it:
// everything it accepts must be small enough to list the tensors it implies.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_support.h"
#include "worker/checkpoint.h"
#include "worker/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = epic::ParseModelConfig(text, "config.json");
  if (!config.ok()) {
    EPIC_FUZZ_CHECK(!config.status().message().empty());
    return 0;
  }
  const epic::ModelConfig& c = *config;
  EPIC_FUZZ_CHECK(c.num_hidden_layers > 0 && c.vocab_size > 0 && c.hidden_size > 0);
  (void)c.Summary();
  (void)c.SoftmaxScale();
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoeLayer(l);
  const std::vector<epic::ExpectedTensor> tensors = epic::ExpectedTensors(c);
  EPIC_FUZZ_CHECK(!tensors.empty());
  for (const epic::ExpectedTensor& t : tensors) {
    for (const int64_t d : t.shape) EPIC_FUZZ_CHECK(d > 0);
  }
  return 0;
}
