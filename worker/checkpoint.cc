#include "worker/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace epic {

std::string LayerTensor(int64_t layer, const std::string& module) {
  return "model.layers." + std::to_string(layer) + "." + module + ".weight";
}

std::string ExpertTensor(int64_t layer, int64_t expert, const std::string& proj) {
  return LayerTensor(layer, "mlp.experts." + std::to_string(expert) + "." + proj);
}

std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& c) {
  std::vector<ExpectedTensor> t;
  const int64_t h = c.hidden_size;
  const int64_t heads = c.num_attention_heads;
  auto mlp = [&](const std::string& prefix, int64_t layer, int64_t inter) {
    t.push_back({LayerTensor(layer, prefix + ".gate_proj"), {inter, h}});
    t.push_back({LayerTensor(layer, prefix + ".up_proj"), {inter, h}});
    t.push_back({LayerTensor(layer, prefix + ".down_proj"), {h, inter}});
  };
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    t.push_back({LayerTensor(l, "input_layernorm"), {h}});
    if (c.q_lora_rank > 0) {
      t.push_back({LayerTensor(l, "self_attn.q_a_proj"), {c.q_lora_rank, h}});
      t.push_back({LayerTensor(l, "self_attn.q_a_layernorm"), {c.q_lora_rank}});
      t.push_back({LayerTensor(l, "self_attn.q_b_proj"), {heads * c.q_head_dim(), c.q_lora_rank}});
    } else {
      t.push_back({LayerTensor(l, "self_attn.q_proj"), {heads * c.q_head_dim(), h}});
    }
    t.push_back({LayerTensor(l, "self_attn.kv_a_proj_with_mqa"), {c.latent_dim(), h}});
    t.push_back({LayerTensor(l, "self_attn.kv_a_layernorm"), {c.kv_lora_rank}});
    t.push_back({LayerTensor(l, "self_attn.kv_b_proj"),
                 {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}});
    t.push_back({LayerTensor(l, "self_attn.o_proj"), {h, heads * c.v_head_dim}});
    t.push_back({LayerTensor(l, "post_attention_layernorm"), {h}});
    if (!c.IsMoeLayer(l)) {
      mlp("mlp", l, c.intermediate_size);
      continue;
    }
    t.push_back({LayerTensor(l, "mlp.gate"), {c.n_routed_experts, h}});
    if (c.topk_method == TopkMethod::kNoauxTc) {
      t.push_back({"model.layers." + std::to_string(l) + ".mlp.gate.e_score_correction_bias",
                   {c.n_routed_experts}});
    }
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      mlp("mlp.experts." + std::to_string(e), l, c.moe_intermediate_size);
    }
    if (c.n_shared_experts > 0) {
      mlp("mlp.shared_experts", l, c.moe_intermediate_size * c.n_shared_experts);
    }
  }
  t.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, h}});
  return t;
}

namespace {

// The files to map: the shards an index names, or every *.safetensors in DIR.
StatusOr<std::vector<std::filesystem::path>> ListShards(const std::filesystem::path& dir,
                                                        std::map<std::string, std::string>* weight_map) {
  const std::filesystem::path index = dir / "model.safetensors.index.json";
  std::vector<std::filesystem::path> files;
  if (std::filesystem::exists(index)) {
    std::ifstream in(index);
    nlohmann::json j;
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      return InvalidArgumentError(index.string() + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return InvalidArgumentError(index.string() + ": needs a 'weight_map' object");
    }
    std::set<std::string> shards;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) {
        return InvalidArgumentError(index.string() + ": weight_map['" + name + "'] is not a file name");
      }
      const std::string f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f.empty()) {
        return InvalidArgumentError(index.string() + ": weight_map['" + name +
                                    "'] names '" + f + "', which is not a file in the directory");
      }
      (*weight_map)[name] = f;
      shards.insert(f);
    }
    for (const std::string& f : shards) files.push_back(dir / f);
    return files;
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
  }
  if (ec) return NotFoundError(dir.string() + ": cannot list: " + ec.message());
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    return NotFoundError(dir.string() + ": no *.safetensors files and no model.safetensors.index.json");
  }
  return files;
}

}  // namespace

StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::filesystem::path& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  EPIC_ASSIGN_OR_RETURN(ckpt->config_, LoadModelConfig(dir));
  std::map<std::string, std::string> weight_map;
  EPIC_ASSIGN_OR_RETURN(std::vector<std::filesystem::path> files, ListShards(dir, &weight_map));
  for (const auto& path : files) {
    EPIC_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    for (const auto& [name, view] : file->tensors()) {
      auto [it, inserted] = ckpt->tensors_.emplace(name, &view);
      if (!inserted) {
        return InvalidArgumentError("tensor '" + name + "' is in both " + *it->second->file +
                                    " and " + path.string());
      }
      ckpt->total_bytes_ += view.nbytes;
    }
    ckpt->files_.push_back(std::move(file));
  }
  for (const auto& [name, file] : weight_map) {
    auto it = ckpt->tensors_.find(name);
    if (it == ckpt->tensors_.end()) {
      return DataLossError((dir / "model.safetensors.index.json").string() + " lists tensor '" +
                           name + "' in " + file + ", which does not hold it");
    }
  }
  EPIC_RETURN_IF_ERROR(ckpt->Validate());
  return ckpt;
}

Status Checkpoint::Validate() const {
  for (const ExpectedTensor& e : ExpectedTensors(config_)) {
    const TensorView* v = Find(e.name);
    if (v == nullptr) {
      return NotFoundError(dir_.string() + ": tensor '" + e.name + "' is missing");
    }
    if (v->dtype == DType::kF8E4M3 || v->dtype == DType::kF8E5M2) {
      return UnimplementedError(*v->file + ": tensor '" + e.name + "' is " + DTypeName(v->dtype) +
                                "; FP8 checkpoints are not supported yet");
    }
    if (v->dtype != DType::kBF16 && v->dtype != DType::kF16 && v->dtype != DType::kF32) {
      return InvalidArgumentError(*v->file + ": tensor '" + e.name + "' has dtype " +
                                  DTypeName(v->dtype) + "; expected BF16, F16 or F32");
    }
    if (v->shape != e.shape) {
      TensorView want;
      want.shape = e.shape;
      return InvalidArgumentError(*v->file + ": tensor '" + e.name + "' has shape " +
                                  v->ShapeString() + " but config.json implies " +
                                  want.ShapeString());
    }
  }
  return OkStatus();
}

void Checkpoint::ReleaseResidentPages() const {
  for (const auto& f : files_) f->ReleaseResidentPages();
}

const TensorView* Checkpoint::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::Get(const std::string& name) const {
  const TensorView* v = Find(name);
  if (v == nullptr) {
    // Open() validated every expected tensor; reaching here is a programming error.
    std::fprintf(stderr, "epic: internal error: tensor '%s' requested but not validated\n", name.c_str());
    std::abort();
  }
  return *v;
}

}  // namespace epic
