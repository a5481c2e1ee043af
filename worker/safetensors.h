// Safetensors files, memory-mapped. Every header entry is checked against the file
// (dtype known, offsets inside the data, byte count equal to the shape's) when the
// file is opened, so a truncated or corrupt file is an error naming the file and
// tensor, never a read past the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace epic {

enum class DType { kF32, kF16, kBF16, kF8E4M3, kF8E5M2, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

const char* DTypeName(DType dtype);
int64_t DTypeSize(DType dtype);

// A tensor inside a mapped file. Valid while the file that holds it is open.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  int64_t nbytes = 0;
  const std::string* file = nullptr;  // the file that holds it, for messages

  int64_t numel() const;
  std::string ShapeString() const;  // "[2048, 512]"
  // Element I (row-major) widened to float. REQUIRES: dtype is F32, BF16 or F16.
  float FloatAt(int64_t i) const;
  // All elements widened to float into OUT[numel()]. REQUIRES: as FloatAt.
  void ToFloat(float* out) const;
};

class SafetensorsFile {
 public:
  // Maps PATH and validates its header.
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  int64_t size_bytes() const { return size_; }
  // Drops this process's mapping of the file's pages (they stay in the page cache and
  // fault back in if read again): after the weights were copied, so that they are not
  // counted twice in the resident set.
  void ReleaseResidentPages() const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  int64_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
};

// A tensor to write: its name, dtype and shape; the bytes come from a FillFn.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t nbytes() const;
};

// Fills the little-endian bytes of specs[index] (nbytes() of them) into OUT.
using FillFn = std::function<void(size_t index, std::byte* out)>;

// Writes SPECS to PATH in the safetensors format, one tensor at a time so that a
// checkpoint larger than memory can be written.
Status WriteSafetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                        const FillFn& fill, const std::map<std::string, std::string>& metadata = {});

}  // namespace epic
