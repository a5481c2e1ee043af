// Checkpoint::Open on good checkpoints (one file, shards, each dtype) and on damaged
// copies: every failure must be an error naming the file and, where there is one,
// the tensor, never a crash or a read past the end.
#include "worker/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/half.h"
#include "tests/testing/temp_dir.h"
#include "worker/random_checkpoint.h"
#include "worker/safetensors.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string ReadBytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void WriteText(const fs::path& path, const std::string& text) { WriteBytes(path, text); }

// The tiny preset (3 layers: dense, then MoE with 16 experts), or CONFIG_NAME.
void WriteModel(const fs::path& dir, DType dtype = DType::kBF16, int shards = 1,
                const std::string& preset = "tiny", uint64_t seed = 1) {
  StatusOr<json> config = PresetConfig(preset);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  RandomCheckpointOptions options;
  options.seed = seed;
  options.dtype = dtype;
  options.shards = shards;
  const Status s = WriteRandomCheckpoint(*config, dir, options);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

// Expects opening DIR to fail with CODE and a message holding every one of WORDS.
void ExpectOpenFails(const fs::path& dir, StatusCode code, const std::vector<std::string>& words) {
  const StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_FALSE(ckpt.ok()) << "opened a damaged checkpoint in " << dir;
  const Status& s = ckpt.status();
  EXPECT_EQ(s.code(), code) << s.ToString();
  for (const std::string& w : words) {
    EXPECT_NE(s.message().find(w), std::string::npos) << "'" << w << "' not in: " << s.ToString();
  }
}

// Rewrites the safetensors file PATH through EDIT, which may change a tensor's spec or
// return false to drop it. Bytes are kept where the size is unchanged, else zero.
void RewriteTensors(const fs::path& path, const std::function<bool(TensorSpec&)>& edit) {
  const fs::path tmp = path.string() + ".rewrite";
  {
    StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    std::vector<TensorSpec> specs;
    std::vector<const TensorView*> sources;
    for (const auto& [name, view] : (*file)->tensors()) {
      TensorSpec spec{name, view.dtype, view.shape};
      if (!edit(spec)) continue;
      specs.push_back(spec);
      sources.push_back(&view);
    }
    const Status s = WriteSafetensors(tmp, specs, [&](size_t i, std::byte* out) {
      if (specs[i].nbytes() == sources[i]->nbytes) {
        std::memcpy(out, sources[i]->data, specs[i].nbytes());
      } else {
        std::memset(out, 0, specs[i].nbytes());
      }
    });
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  fs::rename(tmp, path);
}

// Rewrites the JSON header of the safetensors file PATH through EDIT, keeping the
// data bytes as they are.
void PatchHeader(const fs::path& path, const std::function<void(json&)>& edit) {
  const std::string bytes = ReadBytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t len = 0;
  std::memcpy(&len, bytes.data(), 8);
  json header = json::parse(bytes.substr(8, len));
  edit(header);
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  const uint64_t new_len = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &new_len, 8);
  WriteBytes(path, out + text + bytes.substr(8 + len));
}

json ReadJson(const fs::path& path) { return json::parse(ReadBytes(path)); }

// Every expected tensor of CKPT: the shape ExpectedTensors gives, the stated dtype,
// and the very bytes its file holds at the header's offsets (read here independently).
void ExpectTensorsMatchFiles(const Checkpoint& ckpt, DType dtype) {
  std::map<std::string, std::string> file_bytes;  // path -> contents
  int64_t total = 0;
  for (const ExpectedTensor& e : ExpectedTensors(ckpt.config())) {
    SCOPED_TRACE(e.name);
    const TensorView* v = ckpt.Find(e.name);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(&ckpt.Get(e.name), v);
    EXPECT_EQ(v->name, e.name);
    EXPECT_EQ(v->shape, e.shape);
    const bool bias = e.name.find("e_score_correction_bias") != std::string::npos;
    EXPECT_EQ(v->dtype, bias ? DType::kF32 : dtype);
    EXPECT_EQ(v->nbytes, v->numel() * DTypeSize(v->dtype));
    total += v->nbytes;

    ASSERT_NE(v->file, nullptr);
    std::string& bytes = file_bytes[*v->file];
    if (bytes.empty()) bytes = ReadBytes(*v->file);
    uint64_t len = 0;
    std::memcpy(&len, bytes.data(), 8);
    const json entry = json::parse(bytes.substr(8, len)).at(e.name);
    const uint64_t begin = entry["data_offsets"][0];
    const uint64_t end = entry["data_offsets"][1];
    ASSERT_EQ(static_cast<int64_t>(end - begin), v->nbytes);
    EXPECT_EQ(std::memcmp(v->data, bytes.data() + 8 + len + begin, v->nbytes), 0);
  }
  EXPECT_EQ(ckpt.total_bytes(), total);
  EXPECT_EQ(ckpt.Find("model.layers.0.no_such.weight"), nullptr);
  EXPECT_EQ(ckpt.Find(""), nullptr);
}

float FloatAt(const TensorView& v, int64_t i) {
  if (v.dtype == DType::kF32) {
    float f;
    std::memcpy(&f, v.data + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, v.data + 2 * i, 2);
  return v.dtype == DType::kBF16 ? Bf16ToFloat(h) : F16ToFloat(h);
}

TEST(CheckpointTest, OpensOneFile) {
  testing::TempDir dir("ckpt_one");
  WriteModel(dir.path());
  StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  EXPECT_EQ((*ckpt)->num_files(), 1);
  EXPECT_EQ((*ckpt)->dir(), dir.path());
  EXPECT_EQ((*ckpt)->config().hidden_size, 64);
  ExpectTensorsMatchFiles(**ckpt, DType::kBF16);
}

TEST(CheckpointTest, OpensShardsThroughTheIndex) {
  testing::TempDir one("ckpt_one");
  testing::TempDir sharded("ckpt_sharded");
  WriteModel(one.path(), DType::kBF16, 1);
  WriteModel(sharded.path(), DType::kBF16, 3);
  ASSERT_TRUE(fs::exists(sharded / "model.safetensors.index.json"));
  StatusOr<std::unique_ptr<Checkpoint>> a = Checkpoint::Open(one.path());
  StatusOr<std::unique_ptr<Checkpoint>> b = Checkpoint::Open(sharded.path());
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->num_files(), 3);
  ExpectTensorsMatchFiles(**b, DType::kBF16);
  // The same seed holds the same bytes however it is split.
  for (const ExpectedTensor& e : ExpectedTensors((*a)->config())) {
    const TensorView& x = (*a)->Get(e.name);
    const TensorView& y = (*b)->Get(e.name);
    ASSERT_EQ(x.nbytes, y.nbytes) << e.name;
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes), 0) << e.name;
  }
  // The index says which shard holds each tensor.
  const json index = ReadJson(sharded / "model.safetensors.index.json");
  for (const auto& [name, file] : index["weight_map"].items()) {
    EXPECT_EQ(fs::path(*(*b)->Get(name).file).filename(), file.get<std::string>()) << name;
  }
}

TEST(CheckpointTest, OpensEveryFloatDtypeWithTheSameValues) {
  testing::TempDir f32_dir("ckpt_f32");
  WriteModel(f32_dir.path(), DType::kF32);
  StatusOr<std::unique_ptr<Checkpoint>> f32 = Checkpoint::Open(f32_dir.path());
  ASSERT_TRUE(f32.ok()) << f32.status().ToString();
  ExpectTensorsMatchFiles(**f32, DType::kF32);
  for (const DType dtype : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    testing::TempDir dir("ckpt_16");
    WriteModel(dir.path(), dtype, 2);
    StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir.path());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status().ToString();
    ExpectTensorsMatchFiles(**ckpt, dtype);
    // The 16-bit values are the F32 ones rounded.
    for (const std::string name : {"model.embed_tokens.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                                   "model.norm.weight"}) {
      const TensorView& wide = (*f32)->Get(name);
      const TensorView& narrow = (*ckpt)->Get(name);
      for (int64_t i = 0; i < wide.numel(); i += 7) {
        const float f = FloatAt(wide, i);
        const float rounded = dtype == DType::kF16 ? F16ToFloat(FloatToF16(f)) : Bf16ToFloat(FloatToBf16(f));
        ASSERT_EQ(FloatAt(narrow, i), rounded) << name << "[" << i << "]";
      }
    }
  }
}

TEST(CheckpointTest, V3CorrectionBiasIsF32) {
  testing::TempDir dir("ckpt_v3");
  WriteModel(dir.path(), DType::kBF16, 1, "v3-tiny");
  StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  ExpectTensorsMatchFiles(**ckpt, DType::kBF16);
  const TensorView* bias = (*ckpt)->Find("model.layers.1.mlp.gate.e_score_correction_bias");
  ASSERT_NE(bias, nullptr);
  EXPECT_EQ(bias->dtype, DType::kF32);
  EXPECT_EQ(bias->shape, (std::vector<int64_t>{32}));
}

// A fresh single-file tiny checkpoint to damage.
class DamagedCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override { WriteModel(dir_.path()); }
  fs::path model() const { return dir_ / "model.safetensors"; }
  std::string model_name() const { return model().string(); }
  testing::TempDir dir_{"ckpt_damaged"};
};

TEST_F(DamagedCheckpointTest, MissingTensor) {
  const std::string victim = ExpertTensor(2, 9, "down_proj");
  RewriteTensors(model(), [&](TensorSpec& t) { return t.name != victim; });
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {dir_.path().string(), "'" + victim + "'", "missing"});
}

TEST_F(DamagedCheckpointTest, WrongShape) {
  // kv_b_proj is [heads * (nope + v), kv_lora_rank] = [128, 32]; store it transposed.
  const std::string victim = LayerTensor(1, "self_attn.kv_b_proj");
  RewriteTensors(model(), [&](TensorSpec& t) {
    if (t.name == victim) t.shape = {32, 128};
    return true;
  });
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument,
                  {model_name(), "'" + victim + "'", "[32, 128]", "[128, 32]"});
}

TEST_F(DamagedCheckpointTest, IntegerDtype) {
  const std::string victim = LayerTensor(0, "mlp.up_proj");
  RewriteTensors(model(), [&](TensorSpec& t) {
    if (t.name == victim) t.dtype = DType::kI32;
    return true;
  });
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {model_name(), "'" + victim + "'", "I32"});
}

TEST_F(DamagedCheckpointTest, Fp8IsNotSupportedYet) {
  const std::string victim = LayerTensor(2, "self_attn.q_b_proj");
  RewriteTensors(model(), [&](TensorSpec& t) {
    if (t.name == victim) t.dtype = DType::kF8E4M3;
    return true;
  });
  ExpectOpenFails(dir_.path(), StatusCode::kUnimplemented, {model_name(), "'" + victim + "'", "F8_E4M3"});
}

TEST_F(DamagedCheckpointTest, TruncatedFile) {
  // The writer lays tensors out in ExpectedTensors order, so lm_head's bytes come last.
  fs::resize_file(model(), fs::file_size(model()) - 10);
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'lm_head.weight'", "data_offsets"});
}

TEST_F(DamagedCheckpointTest, TruncatedInsideTheHeaderLength) {
  fs::resize_file(model(), 5);
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "truncated"});
}

TEST_F(DamagedCheckpointTest, HeaderLengthPastTheEnd) {
  std::string bytes = ReadBytes(model());
  const uint64_t huge = uint64_t{1} << 40;
  std::memcpy(bytes.data(), &huge, 8);
  WriteBytes(model(), bytes);
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "header length"});
}

TEST_F(DamagedCheckpointTest, HeaderNotJson) {
  std::string bytes = ReadBytes(model());
  ASSERT_EQ(bytes[8], '{');
  bytes[8] = 'X';
  WriteBytes(model(), bytes);
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "JSON"});
}

TEST_F(DamagedCheckpointTest, HeaderNotAnObject) {
  PatchHeader(model(), [](json& h) { h = json::array({1, 2}); });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "object"});
}

TEST_F(DamagedCheckpointTest, UnknownDtypeString) {
  const std::string victim = LayerTensor(0, "input_layernorm");
  PatchHeader(model(), [&](json& h) { h[victim]["dtype"] = "Q4_K"; });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'" + victim + "'", "Q4_K"});
}

TEST_F(DamagedCheckpointTest, DataOffsetsOutsideTheFile) {
  const std::string victim = LayerTensor(1, "mlp.gate");
  const uintmax_t size = fs::file_size(model());
  PatchHeader(model(), [&](json& h) { h[victim]["data_offsets"] = json::array({size, size + 4096}); });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'" + victim + "'", "data_offsets"});
}

TEST_F(DamagedCheckpointTest, DataOffsetsBackwards) {
  const std::string victim = LayerTensor(1, "mlp.gate");
  PatchHeader(model(), [&](json& h) { h[victim]["data_offsets"] = json::array({4096, 0}); });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'" + victim + "'", "data_offsets"});
}

TEST_F(DamagedCheckpointTest, ByteCountDisagreesWithShape) {
  const std::string victim = "model.norm.weight";
  PatchHeader(model(), [&](json& h) {
    const uint64_t begin = h[victim]["data_offsets"][0];
    h[victim]["data_offsets"] = json::array({begin, begin + 2});
  });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'" + victim + "'", "bytes"});
}

// Found by trying: a header length a few bytes short, into the header's padding, parses,
// and every tensor would then be read shifted. The data section must be covered exactly.
TEST_F(DamagedCheckpointTest, HeaderLengthShortIntoThePadding) {
  PatchHeader(model(), [](json&) {});  // now padded to a multiple of 8 with spaces
  std::string bytes = ReadBytes(model());
  uint64_t len = 0;
  std::memcpy(&len, bytes.data(), 8);
  // Four more spaces of padding, but the length stays: it now ends 4 bytes short.
  const std::string header = bytes.substr(8, len) + "    ";
  WriteBytes(model(), bytes.substr(0, 8) + header + bytes.substr(8 + len));
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "data bytes"});
}

TEST_F(DamagedCheckpointTest, OverlappingOffsets) {
  PatchHeader(model(), [&](json& h) {
    // Two norms of one size: the second now aliases the first's bytes.
    h[LayerTensor(1, "input_layernorm")]["data_offsets"] = h[LayerTensor(0, "input_layernorm")]["data_offsets"];
  });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "data section"});
}

TEST_F(DamagedCheckpointTest, NumberPastADoubleInTheHeader) {
  std::string bytes = ReadBytes(model());
  uint64_t len = 0;
  std::memcpy(&len, bytes.data(), 8);
  std::string header = bytes.substr(8, len);
  const size_t at = header.find("\"shape\":[");
  ASSERT_NE(at, std::string::npos);
  header.insert(at + 9, "1e400,");
  const uint64_t new_len = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &new_len, 8);
  WriteBytes(model(), out + header + bytes.substr(8 + len));
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "JSON"});
}

TEST_F(DamagedCheckpointTest, HeaderEntryWithoutShape) {
  const std::string victim = "model.norm.weight";
  PatchHeader(model(), [&](json& h) { h[victim].erase("shape"); });
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss, {model_name(), "'" + victim + "'"});
}

TEST_F(DamagedCheckpointTest, TensorInTwoFiles) {
  fs::copy_file(model(), dir_ / "model-copy.safetensors");
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {"model-copy.safetensors", model_name(), "both"});
}

TEST_F(DamagedCheckpointTest, ConfigNotJson) {
  WriteText(dir_ / "config.json", "{\"model_type\": \"deepseek_v2\",");
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {(dir_ / "config.json").string(), "JSON"});
}

TEST_F(DamagedCheckpointTest, ConfigMissingAField) {
  json config = ReadJson(dir_ / "config.json");
  config.erase("kv_lora_rank");
  WriteText(dir_ / "config.json", config.dump());
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {(dir_ / "config.json").string(), "'kv_lora_rank'"});
}

TEST_F(DamagedCheckpointTest, ConfigDisagreesWithTheWeights) {
  // A config saying 4 more layers than the file holds: layer 3's tensors are missing.
  json config = ReadJson(dir_ / "config.json");
  config["num_hidden_layers"] = 7;
  WriteText(dir_ / "config.json", config.dump());
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {"'model.layers.3.input_layernorm.weight'", "missing"});
}

TEST_F(DamagedCheckpointTest, MissingConfig) {
  fs::remove(dir_ / "config.json");
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {(dir_ / "config.json").string()});
}

TEST_F(DamagedCheckpointTest, NoWeights) {
  fs::remove(model());
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {dir_.path().string(), "safetensors"});
}

TEST(CheckpointTest, EmptyDirectory) {
  testing::TempDir dir("ckpt_empty");
  ExpectOpenFails(dir.path(), StatusCode::kNotFound, {(dir / "config.json").string()});
}

TEST(CheckpointTest, MissingDirectory) {
  testing::TempDir dir("ckpt_parent");
  ExpectOpenFails(dir / "absent", StatusCode::kNotFound, {(dir / "absent" / "config.json").string()});
}

// A fresh three-shard tiny checkpoint to damage through its index.
class DamagedIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    WriteModel(dir_.path(), DType::kBF16, 3);
    index_ = ReadJson(index_path());
  }
  fs::path index_path() const { return dir_ / "model.safetensors.index.json"; }
  void WriteIndex() { WriteText(index_path(), index_.dump(2)); }
  testing::TempDir dir_{"ckpt_index"};
  json index_;
};

TEST_F(DamagedIndexTest, NamesAMissingShard) {
  const std::string missing = "model-00004-of-00004.safetensors";
  index_["weight_map"]["model.norm.weight"] = missing;
  WriteIndex();
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {(dir_ / missing).string()});
}

TEST_F(DamagedIndexTest, ShardRemoved) {
  fs::remove(dir_ / "model-00002-of-00003.safetensors");
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {(dir_ / "model-00002-of-00003.safetensors").string()});
}

TEST_F(DamagedIndexTest, ListsATensorTheShardLacks) {
  const std::string ghost = "model.layers.0.self_attn.ghost.weight";
  index_["weight_map"][ghost] = "model-00001-of-00003.safetensors";
  WriteIndex();
  ExpectOpenFails(dir_.path(), StatusCode::kDataLoss,
                  {index_path().string(), "'" + ghost + "'", "model-00001-of-00003.safetensors"});
}

TEST_F(DamagedIndexTest, LeavesOutAShardWithRequiredTensors) {
  // An index that never names shard 3 leaves its tensors missing; the loader reports
  // the first of them in layer order.
  const std::string dropped = "model-00003-of-00003.safetensors";
  json map = json::object();
  for (const auto& [name, file] : index_["weight_map"].items()) {
    if (file != dropped) map[name] = file;
  }
  StatusOr<ModelConfig> config = LoadModelConfig(dir_.path());
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  std::string first_missing;
  for (const ExpectedTensor& e : ExpectedTensors(*config)) {
    if (!map.contains(e.name)) {
      first_missing = e.name;
      break;
    }
  }
  ASSERT_FALSE(first_missing.empty());
  index_["weight_map"] = map;
  WriteIndex();
  ExpectOpenFails(dir_.path(), StatusCode::kNotFound, {"'" + first_missing + "'", "missing"});
}

TEST_F(DamagedIndexTest, IndexNotJson) {
  WriteText(index_path(), "{\"weight_map\": ");
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {index_path().string(), "JSON"});
}

TEST_F(DamagedIndexTest, IndexWithoutWeightMap) {
  index_.erase("weight_map");
  WriteIndex();
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument, {index_path().string(), "weight_map"});
}

TEST_F(DamagedIndexTest, ShardOutsideTheDirectory) {
  index_["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
  WriteIndex();
  ExpectOpenFails(dir_.path(), StatusCode::kInvalidArgument,
                  {index_path().string(), "'model.norm.weight'", "../elsewhere.safetensors"});
}

}  // namespace
}  // namespace epic
