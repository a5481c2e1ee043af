#!/usr/bin/python3
"""An independent byte-level BPE encoder for tokenizer_test: a test peer, never part of
the server. Written plainly from the Hugging Face tokenizers semantics (added tokens
matched leftmost-longest before pre-tokenization, Split/Isolated, ByteLevel, BPE by merge
rank), on Python's `regex` module instead of PCRE2.

usage: bpe_peer.py DIR  < texts.jsonl  > ids.jsonl
Each input line is {"text": ..., "add_special_tokens": bool}; each output line the ids.
"""
import json
import os
import sys

import regex


def bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHAR = bytes_to_unicode()


def is_word_char(c):
    return c.isalnum() or c == "_" or regex.match(r"[\p{L}\p{N}]", c) is not None


class Peer:
    def __init__(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            tok = json.load(f)
        config = {}
        path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        model = tok["model"]
        self.vocab = dict(model["vocab"])
        self.ranks = {}
        for rank, merge in enumerate(model["merges"]):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            self.ranks[(a, b)] = rank
        self.added = tok.get("added_tokens") or []
        for t in self.added:
            self.vocab[t["content"]] = t["id"]
        self.patterns = []
        self.prefix_space = False
        self.collect(tok.get("pre_tokenizer"))
        self.prefix, self.suffix = [], []
        if config.get("tokenizer_class") in ("LlamaTokenizerFast", "LlamaTokenizer"):
            def content(v):
                return v if isinstance(v, str) else v["content"]
            if config.get("add_bos_token", True):
                self.prefix = [self.vocab[content(config["bos_token"])]]
            if config.get("add_eos_token", False):
                self.suffix = [self.vocab[content(config["eos_token"])]]

    def collect(self, node):
        if node is None:
            return
        if node["type"] == "Sequence":
            for p in node["pretokenizers"]:
                self.collect(p)
        elif node["type"] == "Split":
            self.patterns.append(regex.compile(node["pattern"]["Regex"]))
        elif node["type"] == "ByteLevel":
            self.prefix_space = node.get("add_prefix_space", False)
            if node.get("use_regex", True):
                self.patterns.append(regex.compile(
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"))
        else:
            raise ValueError("peer: unsupported pre-tokenizer " + node["type"])

    def split_added(self, text, tokens):
        """Pieces of TEXT as (string, added_id or None)."""
        out, done, i = [], 0, 0
        while i < len(text):
            best = None
            for t in tokens:
                c = t["content"]
                if text.startswith(c, i) and (best is None or len(c) > len(best["content"])):
                    best = t
            if best is None:
                i += 1
                continue
            start, stop = i, i + len(best["content"])
            i = stop
            if best.get("single_word"):
                if (start > 0 and is_word_char(text[start - 1])) or (stop < len(text) and is_word_char(text[stop])):
                    continue
            if best.get("lstrip"):
                while start > done and text[start - 1].isspace():
                    start -= 1
            if best.get("rstrip"):
                while stop < len(text) and text[stop].isspace():
                    stop += 1
                i = stop
            if start > done:
                out.append((text[done:start], None))
            out.append((text[start:stop], best["id"]))
            done = stop
        if done < len(text):
            out.append((text[done:], None))
        return out

    def pre_tokenize(self, text):
        pieces = [text]
        for pattern in self.patterns:
            nxt = []
            for p in pieces:
                prev = 0
                for m in pattern.finditer(p):
                    if m.start() == m.end():
                        continue
                    if m.start() > prev:
                        nxt.append(p[prev:m.start()])
                    nxt.append(m.group())
                    prev = m.end()
                if prev < len(p):
                    nxt.append(p[prev:])
            pieces = nxt
        return pieces

    def bpe(self, word):
        symbols = [BYTE_CHAR[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        return [self.vocab[s] for s in symbols]

    def encode(self, text, add_special):
        raw_tokens = [t for t in self.added if t.get("special") or not t.get("normalized", not t.get("special"))]
        norm_tokens = [t for t in self.added if t not in raw_tokens]
        ids = list(self.prefix) if add_special else []
        for piece, added_id in self.split_added(text, raw_tokens):
            if added_id is not None:
                ids.append(added_id)
                continue
            for sub, sub_id in self.split_added(piece, norm_tokens):
                if sub_id is not None:
                    ids.append(sub_id)
                    continue
                for word in self.pre_tokenize(sub):
                    if self.prefix_space and not word.startswith(" "):
                        word = " " + word
                    ids.extend(self.bpe(word))
        if add_special:
            ids.extend(self.suffix)
        return ids


def main():
    peer = Peer(sys.argv[1])
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(peer.encode(request["text"], request.get("add_special_tokens", True))))


if __name__ == "__main__":
    main()
