#include "worker/safetensors.h"

#include <algorithm>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "common/half.h"

namespace epic {
namespace {

struct DTypeInfo {
  const char* name;
  DType dtype;
  int64_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {"F32", DType::kF32, 4},      {"F16", DType::kF16, 2},         {"BF16", DType::kBF16, 2},
    {"F8_E4M3", DType::kF8E4M3, 1}, {"F8_E5M2", DType::kF8E5M2, 1}, {"F64", DType::kF64, 8},
    {"I64", DType::kI64, 8},      {"I32", DType::kI32, 4},         {"I16", DType::kI16, 2},
    {"I8", DType::kI8, 1},        {"U8", DType::kU8, 1},           {"BOOL", DType::kBool, 1},
};

bool ParseDType(const std::string& name, DType* out) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) {
      *out = info.dtype;
      return true;
    }
  }
  return false;
}

// Largest header we accept; the format's reference reader uses 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

}  // namespace

const char* DTypeName(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

int64_t DTypeSize(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info.size;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

float TensorView::FloatAt(int64_t i) const {
  uint16_t h;
  float f;
  switch (dtype) {
    case DType::kF32:
      std::memcpy(&f, data + 4 * i, 4);
      return f;
    case DType::kBF16:
      std::memcpy(&h, data + 2 * i, 2);
      return Bf16ToFloat(h);
    case DType::kF16:
      std::memcpy(&h, data + 2 * i, 2);
      return F16ToFloat(h);
    default:
      return NAN;  // validated checkpoints never get here
  }
}

void TensorView::ToFloat(float* out) const {
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) out[i] = FloatAt(i);
}

std::string TensorView::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::filesystem::path& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path.string();
  const std::string& p = file->path_;

  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFoundError(p + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return DataLossError(p + ": cannot stat: " + std::strerror(errno));
  }
  file->size_ = st.st_size;
  if (file->size_ < 8) {
    ::close(fd);
    return DataLossError(p + ": truncated: " + std::to_string(file->size_) +
                         " bytes is shorter than the 8-byte safetensors header length");
  }
  void* map = ::mmap(nullptr, static_cast<size_t>(file->size_), PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return DataLossError(p + ": cannot map: " + std::strerror(errno));
  file->map_ = map;
  const auto* base = static_cast<const std::byte*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian, as are the hosts epic runs on
  if (header_len > kMaxHeaderBytes || header_len > static_cast<uint64_t>(file->size_ - 8)) {
    return DataLossError(p + ": header length " + std::to_string(header_len) +
                         " does not fit in a file of " + std::to_string(file->size_) +
                         " bytes (truncated or not a safetensors file)");
  }
  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  const int64_t data_size = file->size_ - data_start;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base + 8),
                                   reinterpret_cast<const char*>(base + data_start));
  } catch (const nlohmann::json::exception& e) {  // parse errors, and numbers past a double
    return DataLossError(p + ": header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) return DataLossError(p + ": header is not a JSON object");

  std::vector<std::pair<uint64_t, uint64_t>> spans;  // every tensor's [begin, end)
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    auto bad = [&, &name = name](const std::string& what) {  // clang 14 captures no structured binding
      return DataLossError(p + ": tensor '" + name + "': " + what);
    };
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      return bad("header entry needs dtype, shape and data_offsets");
    }
    const auto& dtype = entry.at("dtype");
    const auto& shape = entry.at("shape");
    const auto& offsets = entry.at("data_offsets");
    TensorView view;
    view.name = name;
    view.file = &file->path_;
    if (!dtype.is_string() || !ParseDType(dtype.get<std::string>(), &view.dtype)) {
      return bad("unknown dtype " + dtype.dump());
    }
    if (!shape.is_array()) return bad("shape is not a list");
    int64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) return bad("shape " + shape.dump() + " has a bad dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()) ||
          (dim != 0 && numel > std::numeric_limits<int64_t>::max() / 4 / static_cast<int64_t>(dim))) {
        return bad("shape " + shape.dump() + " is too large");
      }
      numel *= static_cast<int64_t>(dim);
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      return bad("data_offsets must be [begin, end]");
    }
    const uint64_t begin = offsets[0].get<uint64_t>();
    const uint64_t end = offsets[1].get<uint64_t>();
    if (begin > end || end > static_cast<uint64_t>(data_size)) {
      return bad("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                 "] lie outside the " + std::to_string(data_size) +
                 " data bytes (file truncated or corrupt)");
    }
    view.nbytes = static_cast<int64_t>(end - begin);
    if (view.nbytes != numel * DTypeSize(view.dtype)) {
      return bad("holds " + std::to_string(view.nbytes) + " bytes but shape " + shape.dump() +
                 " of " + DTypeName(view.dtype) + " needs " +
                 std::to_string(numel * DTypeSize(view.dtype)));
    }
    view.data = base + data_start + begin;
    file->tensors_.emplace(name, std::move(view));
    spans.emplace_back(begin, end);
  }
  // The format's data section is the tensors back to back, nothing between, nothing
  // shared: a header length a few bytes short (into the padding) shifts every tensor,
  // and only this check notices.
  std::sort(spans.begin(), spans.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : spans) {
    if (begin != covered) {
      return DataLossError(p + ": tensor data " + (begin < covered ? "overlaps" : "has a gap") + " at byte " +
                           std::to_string(std::min(begin, covered)) +
                           " of the data section (data_offsets must cover it exactly, back to back)");
    }
    covered = end;
  }
  if (covered != static_cast<uint64_t>(data_size)) {
    return DataLossError(p + ": the tensors cover " + std::to_string(covered) + " of the " +
                         std::to_string(data_size) + " data bytes (header length wrong, or the file damaged)");
  }
  return file;
}

void SafetensorsFile::ReleaseResidentPages() const {
  if (map_ != nullptr) ::madvise(map_, static_cast<size_t>(size_), MADV_DONTNEED);
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, static_cast<size_t>(size_));
}

int64_t TensorSpec::nbytes() const {
  int64_t n = DTypeSize(dtype);
  for (int64_t d : shape) n *= d;
  return n;
}

Status WriteSafetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                        const FillFn& fill, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorSpec& t : specs) {
    const uint64_t n = static_cast<uint64_t>(t.nbytes());
    header[t.name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return NotFoundError(path.string() + ": cannot create");
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::vector<std::byte> buffer;
  for (size_t i = 0; i < specs.size(); ++i) {
    buffer.resize(static_cast<size_t>(specs[i].nbytes()));
    fill(i, buffer.data());
    out.write(reinterpret_cast<const char*>(buffer.data()), static_cast<std::streamsize>(buffer.size()));
  }
  out.close();
  if (!out) return DataLossError(path.string() + ": write failed (disk full?)");
  return OkStatus();
}

}  // namespace epic
