"""Conditioning encoders (CompVis ``ldm/modules/encoders/modules.py``).

Every encoder has ``encode(batch) -> tensor``: texts -> (B, T, D) context, class labels ->
(B, 1, D), images -> rescaled images. Parameter names are those of ``cond_stage_model.*`` in the
CompVis/SD checkpoints. Nothing is downloaded: tokenizers and CLIP models come from local files.
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


def _texts(batch, key):
    if isinstance(batch, dict):
        if key not in batch:
            raise ValueError(f"encode: the batch has no {key!r} entry (keys: {sorted(batch)})")
        batch = batch[key]
    return [batch] if isinstance(batch, str) else batch


class ClassEmbedder(nn.Module):
    """Learned class embedding: labels (B,) -> (B, 1, embed_dim) for cross-attention."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels):
        return self.embedding(labels[:, None])

    def encode(self, batch):
        """batch: labels as a tensor, a list of ints, or a dict holding them under ``key``."""
        labels = batch[self.key] if isinstance(batch, dict) else batch
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long().reshape(-1)
        return self(labels)


# ---------------------------------------------------------------------------------- tokenizers

class WordTokenizer:
    """A word-level tokenizer whose vocabulary travels in the model config.

    Lower-cases, splits into words and punctuation, maps unknown words to ``[UNK]``, wraps with
    ``[CLS]``/``[SEP]`` and pads with ``[PAD]`` (id 0) to ``max_length`` (BERT's layout).
    """

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
    _split = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab, max_length: int = 77, lowercase: bool = True):
        if isinstance(vocab, (str, os.PathLike)):
            vocab = self.read_vocab(vocab)
        words = [w for w in self.SPECIALS if w not in vocab] + list(vocab)
        self.vocab = words
        self.ids = {w: i for i, w in enumerate(words)}
        if self.ids["[PAD]"] != 0:
            raise ValueError("WordTokenizer: [PAD] must have id 0")
        self.max_length, self.lowercase = max_length, lowercase

    @staticmethod
    def read_vocab(path):
        """A .json list (or token -> id dict) or a text file with one token per line."""
        if not os.path.isfile(path):
            raise ValueError(f"WordTokenizer: vocabulary file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            if str(path).endswith(".json"):
                data = json.load(f)
                return sorted(data, key=data.get) if isinstance(data, dict) else list(data)
            return [line.rstrip("\n") for line in f if line.strip()]

    def __len__(self):
        return len(self.vocab)

    def tokenize(self, text: str):
        words = self._split.findall(text.lower() if self.lowercase else text)
        unk = self.ids["[UNK]"]
        ids = [self.ids.get(w, unk) for w in words][: self.max_length - 2]
        ids = [self.ids["[CLS]"]] + ids + [self.ids["[SEP]"]]
        return ids + [0] * (self.max_length - len(ids))

    def __call__(self, texts):
        return torch.tensor([self.tokenize(t) for t in texts], dtype=torch.long)

    def to_config(self):
        return {"type": "word", "vocab": list(self.vocab), "max_length": self.max_length,
                "lowercase": self.lowercase}


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (``local_files_only``)."""

    def __init__(self, path, max_length: int = 77):
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer directory {path!r} does not exist (nothing is downloaded)")
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises several types for unusable folders
            raise ValueError(f"could not read a tokenizer from {path!r}: {e}") from e
        self.path, self.max_length = str(path), max_length

    def __len__(self):
        return len(self.tokenizer)

    def __call__(self, texts):
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")
        return enc["input_ids"]

    def to_config(self):
        return {"type": "hf", "path": self.path, "max_length": self.max_length}


def make_tokenizer(cfg, max_length: int = 77):
    """A tokenizer from its config: {"type": "word", "vocab": [...] or path} or
    {"type": "hf", "path": dir}; None gives None."""
    if cfg is None:
        return None
    kind = cfg.get("type", "word")
    if kind == "word":
        return WordTokenizer(cfg["vocab"], cfg.get("max_length", max_length),
                             cfg.get("lowercase", True))
    if kind == "hf":
        return HFTokenizer(cfg["path"], cfg.get("max_length", max_length))
    raise ValueError(f"unknown tokenizer type {kind!r} (word, hf)")


# -------------------------------------------------------------- the paper's transformer encoder

class _Attention(nn.Module):
    """x-transformers' ``Attention`` (bidirectional, no bias on q, k, v)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        shape = (b, n, self.heads, self.dim_head)
        out = ops.attention(self.to_q(x).view(shape), self.to_k(x).view(shape),
                            self.to_v(x).view(shape), self.dim_head ** -0.5)
        return self.to_out(out.reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()),
                                 nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class _AttentionLayers(nn.Module):
    """Pre-norm encoder: ``layers`` alternates [norm, attention, residual] and
    [norm, feed-forward, residual] (the residual slot holds no parameters)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.dim = dim
        layers = []
        for _ in range(depth):
            layers.append(nn.ModuleList([nn.LayerNorm(dim), _Attention(dim, heads, dim_head),
                                         nn.Identity()]))
            layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim), nn.Identity()]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for norm, block, _ in self.layers:
            x = block(norm(x)) + x
        return x


class _PositionalEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)


class _TransformerWrapper(nn.Module):
    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int,
                 dim_head: int):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = _PositionalEmbedding(dim, max_seq_len)
        self.attn_layers = _AttentionLayers(dim, depth, heads, dim_head)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)  # unused for embeddings; in the checkpoints
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.emb.weight, std=0.02)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.token_emb(tokens) + self.pos_emb.emb.weight[:n][None]
        return self.norm(self.attn_layers(x))


class TransformerEmbedder(nn.Module):
    """The paper's text encoder (LDM ``BERTEmbedder``): token embedding + pre-norm transformer,
    trained from scratch, returning all T token embeddings (B, T, n_embed)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 heads: int = 8, dim_head: int = 64, tokenizer: dict | None = None,
                 key: str = "caption"):
        super().__init__()
        self.key, self.max_seq_len = key, max_seq_len
        self.tokenizer = make_tokenizer(tokenizer, max_seq_len)
        if self.tokenizer is not None and len(self.tokenizer) > vocab_size:
            raise ValueError(f"TransformerEmbedder: tokenizer has {len(self.tokenizer)} tokens, "
                             f"more than vocab_size {vocab_size}")
        self.transformer = _TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, heads,
                                               dim_head)

    def forward(self, tokens):
        return self.transformer(tokens)

    def tokenize(self, texts):
        if self.tokenizer is None:
            raise ValueError("TransformerEmbedder has no tokenizer: give cond_stage 'tokenizer' "
                             "({'type': 'word', 'vocab': ...} or {'type': 'hf', 'path': dir}) "
                             "or pass token ids")
        return self.tokenizer(texts)

    def encode(self, batch):
        """batch: a string, a list of strings, token ids (B, T), or a dict with ``key``."""
        texts = _texts(batch, self.key)
        tokens = texts if torch.is_tensor(texts) else self.tokenize(texts)
        return self(tokens.to(self.transformer.token_emb.weight.device))


# --------------------------------------------------------------------------------------- CLIP

class CLIPTextEmbedder(nn.Module):
    """SD-1's ``FrozenCLIPEmbedder``: ``transformers.CLIPTextModel`` (key ``transformer.*``) and a
    ``CLIPTokenizer`` from a local directory; the last (or penultimate, SD-2 style) hidden state.

    ``clip_config`` is a ``CLIPTextConfig`` dict; ``tokenizer_path`` a local folder with the
    tokenizer files (vocab.json, merges.txt); ``layer`` is "last" or "penultimate".
    """

    def __init__(self, clip_config: dict, tokenizer_path: str | None = None,
                 max_length: int = 77, layer: str = "last", key: str = "caption"):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel
        if layer not in ("last", "penultimate"):
            raise ValueError(f"CLIPTextEmbedder: layer {layer!r} is not 'last' or 'penultimate'")
        self.layer, self.key, self.max_length = layer, key, max_length
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None
        model = CLIPTextModel(CLIPTextConfig(**clip_config))
        # SD-1 checkpoints name the weights transformer.text_model.*; transformers 5 dropped the
        # text_model level, which a plain holder module restores.
        self.transformer = model if hasattr(model, "text_model") else _CLIPHolder(model)
        self.transformer.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_path:
                raise ValueError("CLIPTextEmbedder has no tokenizer: set cond_stage "
                                 "'tokenizer_path' to a local folder with the CLIP tokenizer files "
                                 "(vocab.json, merges.txt), or pass token ids")
            if not os.path.isdir(self.tokenizer_path):
                raise ValueError(f"CLIP tokenizer folder {self.tokenizer_path!r} does not exist "
                                 "(nothing is downloaded)")
            from transformers import CLIPTokenizer
            try:
                self._tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_path,
                                                                local_files_only=True)
            except Exception as e:
                raise ValueError(f"could not read a CLIP tokenizer from {self.tokenizer_path!r} "
                                 f"(needs vocab.json and merges.txt): {e}") from e
        return self._tokenizer

    def tokenize(self, texts):
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")
        return enc["input_ids"]

    def forward(self, tokens):
        model = self.transformer.text_model
        if self.layer == "last":
            return model(input_ids=tokens).last_hidden_state
        out = model(input_ids=tokens, output_hidden_states=True)
        return model.final_layer_norm(out.hidden_states[-2])

    def encode(self, batch):
        """batch: a string, a list of strings, token ids (B, 77), or a dict with ``key``."""
        texts = _texts(batch, self.key)
        tokens = texts if torch.is_tensor(texts) else self.tokenize(texts)
        return self(tokens.to(self.transformer.text_model.get_input_embeddings().weight.device))


class _CLIPHolder(nn.Module):
    """``text_model`` = a transformers-5 ``CLIPTextModel``; also loads that model's own,
    unprefixed state dicts (``holder.load_state_dict(clip.state_dict())``)."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model
        self.register_load_state_dict_pre_hook(self._add_prefix)

    @staticmethod
    def _add_prefix(module, state_dict, prefix, *args):
        for k in [k for k in state_dict if k.startswith(prefix)
                  and not k.startswith(prefix + "text_model.")]:
            state_dict[prefix + "text_model." + k[len(prefix):]] = state_dict.pop(k)

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


# ------------------------------------------------------------------------------ image encoders

class SpatialRescaler(nn.Module):
    """Resizes a conditioning image ``n_stages`` times by ``multiplier`` and optionally maps its
    channels with a 1x1 conv (key ``channel_mapper``), for concat conditioning."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5,
                 in_channels: int = 3, out_channels: int | None = None, bias: bool = False):
        super().__init__()
        if method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescaler: unknown method {method!r}")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x):
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x):
        return self(x)


class IdentityEncoder(nn.Module):
    """Passes the conditioning through (bsr_sr's low-resolution image, concatenated)."""

    def forward(self, x):
        return x

    def encode(self, x):
        return x
