#!/usr/bin/python3
"""Writes an epic checkpoint (a Hugging Face DeepSeek-V2 directory) as a GGUF file for
llama.cpp, the peer that bench/llama_peer/run.sh times against model_bench.

The layout follows llama.cpp's "deepseek2" architecture with absorbed MLA: kv_b_proj is
split into attn_k_b (transposed) and attn_v_b, and attention is one latent head
(head_count_kv 1, key_length kv_lora + rope, value_length kv_lora).

  to_gguf.py MODEL_DIR OUT.gguf --type bf16|q8_0

bf16 keeps the checkpoint's matrices (epic's exact precision reads the same bytes);
q8_0 stores blocks of 32 int8 values with an fp16 scale (what epic's fast precision is
compared with). Norms and the router stay F32, as llama.cpp's own converter keeps them.
"""
import argparse
import json
import mmap
import re
import struct
import sys
from pathlib import Path

import numpy as np

GGUF_ALIGN = 32
T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 4, 5, 6, 7, 8, 9
GGML_F32, GGML_Q8_0, GGML_BF16 = 0, 8, 30


class Checkpoint:
    """The tensors of every *.safetensors file in a directory, read lazily."""

    def __init__(self, directory: Path):
        self.entries = {}
        self.maps = []
        for path in sorted(directory.glob("*.safetensors")):
            f = open(path, "rb")
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.maps.append(view)
            n = struct.unpack("<Q", view[:8])[0]
            header = json.loads(view[8:8 + n])
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = (view, 8 + n, info)

    def __contains__(self, name):
        return name in self.entries

    def f32(self, name) -> np.ndarray:
        view, base, info = self.entries[name]
        begin, end = info["data_offsets"]
        raw = np.frombuffer(view, dtype=np.uint8, count=end - begin, offset=base + begin)
        if info["dtype"] == "BF16":
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F32":
            values = raw.view(np.float32)
        elif info["dtype"] == "F16":
            values = raw.view(np.float16).astype(np.float32)
        else:
            sys.exit(f"{name}: dtype {info['dtype']} is not supported")
        return values.reshape(info["shape"])


def to_bf16(x: np.ndarray) -> bytes:
    # Round to nearest even, as the checkpoint's own BF16 values already are.
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def to_q8_0(x: np.ndarray) -> bytes:
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[:, None]).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("q", "i1", 32)])
    out["d"] = d.astype(np.float16)
    out["q"] = q
    return out.tobytes()


class GgufWriter:
    def __init__(self):
        self.kv = []
        self.tensors = []  # (name, ggml dims innermost first, type, bytes)

    @staticmethod
    def _str(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def u32(self, key, v):
        self.kv.append(self._str(key) + struct.pack("<II", T_UINT32, v))

    def f32(self, key, v):
        self.kv.append(self._str(key) + struct.pack("<If", T_FLOAT32, v))

    def boolean(self, key, v):
        self.kv.append(self._str(key) + struct.pack("<IB", T_BOOL, int(v)))

    def string(self, key, v):
        self.kv.append(self._str(key) + struct.pack("<I", T_STRING) + self._str(v))

    def strings(self, key, values):
        body = b"".join(self._str(v) for v in values)
        self.kv.append(self._str(key) + struct.pack("<IIQ", T_ARRAY, T_STRING, len(values)) + body)

    def int32s(self, key, values):
        body = np.asarray(values, dtype="<i4").tobytes()
        self.kv.append(self._str(key) + struct.pack("<IIQ", T_ARRAY, T_INT32, len(values)) + body)

    def tensor(self, name, array: np.ndarray, kind):
        dims = list(reversed(array.shape))
        if kind == GGML_Q8_0 and dims[0] % 32:
            kind = GGML_BF16
        data = {GGML_F32: lambda a: np.ascontiguousarray(a, np.float32).tobytes(),
                GGML_BF16: to_bf16, GGML_Q8_0: to_q8_0}[kind](array)
        self.tensors.append((name, dims, kind, data))

    def write(self, path: Path):
        def pad(n):
            return (GGUF_ALIGN - n % GGUF_ALIGN) % GGUF_ALIGN

        infos, offset = [], 0
        for name, dims, kind, data in self.tensors:
            infos.append(self._str(name) + struct.pack("<I", len(dims)) +
                         struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset))
            offset += len(data) + pad(len(data))
        with open(path, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
            for item in self.kv + infos:
                f.write(item)
            f.write(b"\0" * pad(f.tell()))
            for _, _, _, data in self.tensors:
                f.write(data)
                f.write(b"\0" * pad(len(data)))


def write_vocab(w: GgufWriter, model_dir: Path, config: dict):
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE":
        sys.exit("tokenizer.json: only byte-level BPE tokenizers are supported")
    n_vocab = config["vocab_size"]
    pieces = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # unused
    for piece, i in tok["model"]["vocab"].items():
        if i < n_vocab:
            pieces[i], types[i] = piece, 1  # normal
    for added in tok.get("added_tokens", []):
        if added["id"] < n_vocab:
            pieces[added["id"]], types[added["id"]] = added["content"], 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.string("tokenizer.ggml.model", "gpt2")
    w.string("tokenizer.ggml.pre", "deepseek-llm")
    w.strings("tokenizer.ggml.tokens", pieces)
    w.int32s("tokenizer.ggml.token_type", types)
    w.strings("tokenizer.ggml.merges", merges)
    w.u32("tokenizer.ggml.bos_token_id", config["bos_token_id"])
    w.u32("tokenizer.ggml.eos_token_id", config["eos_token_id"])
    w.boolean("tokenizer.ggml.add_bos_token", True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=["bf16", "q8_0"], default="bf16")
    args = parser.parse_args()

    config = json.loads((args.model_dir / "config.json").read_text())
    if config.get("model_type") not in ("deepseek_v2", "deepseek_v3"):
        sys.exit(f"{args.model_dir}: model_type {config.get('model_type')!r} is not DeepSeek-V2")
    ck = Checkpoint(args.model_dir)
    matrix = GGML_Q8_0 if args.type == "q8_0" else GGML_BF16
    arch = "deepseek2"
    c = config
    nope, rope, v_dim, kv_lora = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]

    w = GgufWriter()
    w.string("general.architecture", arch)
    w.string("general.name", args.model_dir.name)
    w.u32("general.alignment", GGUF_ALIGN)
    w.u32(f"{arch}.block_count", c["num_hidden_layers"])
    w.u32(f"{arch}.context_length", c["max_position_embeddings"])
    w.u32(f"{arch}.embedding_length", c["hidden_size"])
    w.u32(f"{arch}.feed_forward_length", c["intermediate_size"])
    w.u32(f"{arch}.attention.head_count", c["num_attention_heads"])
    w.u32(f"{arch}.attention.head_count_kv", 1)
    w.f32(f"{arch}.rope.freq_base", c.get("rope_theta", 10000.0))
    w.f32(f"{arch}.attention.layer_norm_rms_epsilon", c.get("rms_norm_eps", 1e-6))
    w.u32(f"{arch}.expert_used_count", c["num_experts_per_tok"])
    w.u32(f"{arch}.expert_count", c["n_routed_experts"])
    w.u32(f"{arch}.expert_shared_count", c.get("n_shared_experts", 0))
    w.u32(f"{arch}.expert_feed_forward_length", c["moe_intermediate_size"])
    if c.get("topk_method") == "group_limited_greedy" and c.get("n_group", 1) > 1:
        w.u32(f"{arch}.expert_group_count", c["n_group"])
        w.u32(f"{arch}.expert_group_used_count", c["topk_group"])
    if c.get("scoring_func", "softmax") != "softmax":
        sys.exit("only softmax routing is written")
    w.u32(f"{arch}.expert_gating_func", 1)  # softmax
    w.f32(f"{arch}.expert_weights_scale", c.get("routed_scaling_factor", 1.0))
    w.boolean(f"{arch}.expert_weights_norm", bool(c.get("norm_topk_prob", False)))
    w.u32(f"{arch}.leading_dense_block_count", c.get("first_k_dense_replace", 0))
    w.u32(f"{arch}.vocab_size", c["vocab_size"])
    # 0 means no q LoRA (llama.cpp asks for the key unless the model has V2-Lite's 27 layers).
    w.u32(f"{arch}.attention.q_lora_rank", c.get("q_lora_rank") or 0)
    w.u32(f"{arch}.attention.kv_lora_rank", kv_lora)
    w.u32(f"{arch}.attention.key_length", kv_lora + rope)
    w.u32(f"{arch}.attention.value_length", kv_lora)
    w.u32(f"{arch}.attention.key_length_mla", nope + rope)
    w.u32(f"{arch}.attention.value_length_mla", v_dim)
    w.u32(f"{arch}.rope.dimension_count", rope)
    scaling = c.get("rope_scaling") or {}
    if scaling:
        if scaling.get("type", scaling.get("rope_type")) != "yarn":
            sys.exit("only YaRN rope scaling is written")
        w.string(f"{arch}.rope.scaling.type", "yarn")
        w.f32(f"{arch}.rope.scaling.factor", scaling["factor"])
        w.u32(f"{arch}.rope.scaling.original_context_length", scaling["original_max_position_embeddings"])
        w.f32(f"{arch}.rope.scaling.yarn_beta_fast", scaling.get("beta_fast", 32))
        w.f32(f"{arch}.rope.scaling.yarn_beta_slow", scaling.get("beta_slow", 1))
        # llama.cpp reads this key as 0.1 * mscale_all_dim.
        w.f32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * scaling.get("mscale_all_dim", 0.0))
    write_vocab(w, args.model_dir, c)

    def add(name, hf, kind=None):
        w.tensor(name, ck.f32(hf), kind if kind is not None else matrix)

    add("token_embd.weight", "model.embed_tokens.weight")
    add("output_norm.weight", "model.norm.weight", GGML_F32)
    add("output.weight", "lm_head.weight" if "lm_head.weight" in ck else "model.embed_tokens.weight")
    n_heads, n_experts = c["num_attention_heads"], c["n_routed_experts"]
    for i in range(c["num_hidden_layers"]):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", GGML_F32)
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", GGML_F32)
        if c.get("q_lora_rank"):
            add(blk + "attn_q_a.weight", hf + "self_attn.q_a_proj.weight")
            add(blk + "attn_q_a_norm.weight", hf + "self_attn.q_a_layernorm.weight", GGML_F32)
            add(blk + "attn_q_b.weight", hf + "self_attn.q_b_proj.weight")
        else:
            add(blk + "attn_q.weight", hf + "self_attn.q_proj.weight")
        add(blk + "attn_kv_a_mqa.weight", hf + "self_attn.kv_a_proj_with_mqa.weight")
        add(blk + "attn_kv_a_norm.weight", hf + "self_attn.kv_a_layernorm.weight", GGML_F32)
        kv_b = ck.f32(hf + "self_attn.kv_b_proj.weight").reshape(n_heads, nope + v_dim, kv_lora)
        w.tensor(blk + "attn_k_b.weight", kv_b[:, :nope, :].transpose(0, 2, 1), matrix)
        w.tensor(blk + "attn_v_b.weight", kv_b[:, nope:, :], matrix)
        add(blk + "attn_output.weight", hf + "self_attn.o_proj.weight")
        if i < c.get("first_k_dense_replace", 0):
            for proj in ("gate", "up", "down"):
                add(blk + f"ffn_{proj}.weight", hf + f"mlp.{proj}_proj.weight")
            continue
        add(blk + "ffn_gate_inp.weight", hf + "mlp.gate.weight", GGML_F32)
        for proj in ("gate", "up", "down"):
            stacked = np.stack([ck.f32(hf + f"mlp.experts.{e}.{proj}_proj.weight") for e in range(n_experts)])
            w.tensor(blk + f"ffn_{proj}_exps.weight", stacked, matrix)
            add(blk + f"ffn_{proj}_shexp.weight", hf + f"mlp.shared_experts.{proj}_proj.weight")
        print(f"layer {i + 1}/{c['num_hidden_layers']}", file=sys.stderr, flush=True)
    w.write(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB, {len(w.tensors)} tensors)", file=sys.stderr)


if __name__ == "__main__":
    main()
