"""Conditioning encoders: class labels, the paper's transformer text encoder and its
tokenizers, the CLIP text encoder from local files, the spatial rescaler."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import write_clip_tokenizer
from ldmfast import configs
from ldmfast.models import (ClassEmbedder, HFTokenizer, IdentityEncoder, SpatialRescaler,
                            TransformerEmbedder, WordTokenizer, build_cond_stage)


def test_class_embedder():
    e = ClassEmbedder(8, n_classes=5, key="class_label")
    out = e.encode(torch.tensor([0, 4]))
    assert out.shape == (2, 1, 8)
    torch.testing.assert_close(out[:, 0], e.embedding.weight[[0, 4]])
    torch.testing.assert_close(e.encode([0, 4]), out)
    torch.testing.assert_close(e.encode({"class_label": torch.tensor([0, 4])}), out)
    assert list(e.state_dict()) == ["embedding.weight"]


def test_word_tokenizer(tmp_path):
    tok = WordTokenizer(["red", "circle", "a"], max_length=6)
    ids = tok(["A red circle!", "blue"])
    pad, unk, cls, sep = (tok.ids[t] for t in WordTokenizer.SPECIALS)
    assert pad == 0
    assert ids[0].tolist() == [cls, tok.ids["a"], tok.ids["red"], tok.ids["circle"], unk, sep]
    assert ids[1].tolist() == [cls, unk, sep, 0, 0, 0]
    assert tok(["a a a a a a a a"]).shape == (1, 6)  # truncated, [SEP] kept
    assert tok(["a a a a a a a a"])[0, -1] == sep
    (tmp_path / "v.txt").write_text("red\ncircle\na\n")
    (tmp_path / "v.json").write_text(json.dumps({"red": 0, "circle": 1, "a": 2}))
    for name in ("v.txt", "v.json"):
        assert torch.equal(WordTokenizer(str(tmp_path / name), max_length=6)(["a red circle!"]), ids[:1])
    again = WordTokenizer(**{k: v for k, v in tok.to_config().items() if k != "type"})
    assert torch.equal(again(["a red circle!", "blue"]), ids)
    with pytest.raises(ValueError, match="does not exist"):
        WordTokenizer(str(tmp_path / "missing.txt"))


def test_hf_tokenizer_from_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                   "a", "red", "circle"]))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    tok = HFTokenizer(str(tmp_path / "tok"), max_length=8)
    assert tok(["a red circle"])[0].tolist() == [2, 5, 6, 7, 3, 0, 0, 0]
    with pytest.raises(ValueError, match="nothing is downloaded"):
        HFTokenizer(str(tmp_path / "absent"))


def test_transformer_embedder_keys_and_encode():
    cfg = configs.get("tiny")["cond_stage"]
    e = build_cond_stage(cfg).eval()
    keys = set(e.state_dict())
    for k in ("transformer.token_emb.weight", "transformer.pos_emb.emb.weight",
              "transformer.attn_layers.layers.0.0.weight", "transformer.attn_layers.layers.0.1.to_q.weight",
              "transformer.attn_layers.layers.0.1.to_out.bias",
              "transformer.attn_layers.layers.1.1.net.0.0.weight",
              "transformer.attn_layers.layers.1.1.net.2.weight", "transformer.norm.weight",
              "transformer.to_logits.weight"):
        assert k in keys, k  # the x-transformers layout of LDM's BERTEmbedder
    assert "transformer.attn_layers.layers.0.1.to_q.bias" not in keys
    with torch.no_grad():
        out = e.encode(["a red circle", "a small blue square on the sea"])
        assert out.shape == (2, 16, 32)
        torch.testing.assert_close(e.encode({"caption": "a red circle"}), out[:1])
        torch.testing.assert_close(e.encode(e.tokenize(["a red circle"])), out[:1])


def test_transformer_embedder_matches_plain_math():
    torch.manual_seed(0)
    e = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=10, max_seq_len=6, heads=2,
                            dim_head=8).double().eval()
    tokens = torch.tensor([[1, 2, 3, 0]])
    t = e.transformer
    x = t.token_emb(tokens) + t.pos_emb.emb.weight[:4]
    norm, attn, _ = t.attn_layers.layers[0]
    h = norm(x)
    split = lambda v: v.reshape(1, 4, 2, 8).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(attn.to_q(h)) @ split(attn.to_k(h)).transpose(-1, -2) / 8 ** 0.5, -1)
    x = attn.to_out((w @ split(attn.to_v(h))).transpose(1, 2).reshape(1, 4, 16)) + x
    norm, ff, _ = t.attn_layers.layers[1]
    x = ff(norm(x)) + x
    with torch.no_grad():
        torch.testing.assert_close(e(tokens), t.norm(x), rtol=1e-10, atol=1e-10)


def test_transformer_embedder_without_tokenizer():
    e = TransformerEmbedder(n_embed=8, n_layer=1, vocab_size=10, max_seq_len=4, heads=1, dim_head=8)
    assert e.encode(torch.tensor([[1, 2, 0, 0]])).shape == (1, 4, 8)
    with pytest.raises(ValueError, match="no tokenizer"):
        e.encode(["a cat"])
    with pytest.raises(ValueError, match="more than vocab_size"):
        TransformerEmbedder(8, 1, vocab_size=3, tokenizer={"type": "word", "vocab": ["x"]})


@pytest.fixture
def clip_cfg():
    return {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "pad_token_id": 53,
            "bos_token_id": 52, "eos_token_id": 53}



def test_clip_embedder(tmp_path, clip_cfg):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg)).eval()
    tok_dir = write_clip_tokenizer(str(tmp_path / "tok"))
    e = build_cond_stage({"type": "clip", "clip_config": clip_cfg, "tokenizer_path": tok_dir})
    e.transformer.load_state_dict(ref.state_dict())  # a CLIPTextModel's own state dict loads
    assert "transformer.text_model.embeddings.token_embedding.weight" in e.state_dict()  # SD-1 names
    ids = transformers.CLIPTokenizer.from_pretrained(tok_dir)(
        ["a cat", "dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = e.encode(["a cat", "dog"])
        torch.testing.assert_close(out, ref(ids).last_hidden_state)
        assert out.shape == (2, 77, 32)
        pen = build_cond_stage({"type": "clip", "clip_config": clip_cfg, "layer": "penultimate"})
        pen.load_state_dict(e.state_dict())
        hs = ref(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(pen.encode(ids), ref.final_layer_norm(hs))
    with pytest.raises(ValueError, match="no tokenizer"):
        pen.encode(["a cat"])
    with pytest.raises(ValueError, match="does not exist"):
        build_cond_stage({"type": "clip", "clip_config": clip_cfg,
                          "tokenizer_path": str(tmp_path / "absent")}).encode("a cat")


def test_rescaler_and_identity():
    r = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=3, out_channels=5)
    x = torch.randn(1, 3, 16, 16)
    assert r.encode(x).shape == (1, 5, 4, 4)
    assert SpatialRescaler(n_stages=1).encode(x).shape == (1, 3, 8, 8)
    assert IdentityEncoder().encode(x) is x
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="magic")


def test_cond_stage_types():
    assert build_cond_stage(None) is None
    assert build_cond_stage({"type": "first_stage"}) is None
    with pytest.raises(ValueError, match="OpenCLIP"):
        build_cond_stage({"type": "openclip"})
    with pytest.raises(ValueError, match="unknown"):
        build_cond_stage({"type": "t5"})
