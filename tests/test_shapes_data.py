"""The built-in shapes data set and its pixel judge."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ldmfast.data import shapes as S


def test_deterministic_and_index_addressed():
    a = S.ShapesBatches("train", seed=3).batch(np.arange(40))
    b = S.ShapesBatches("train", seed=3).batch(np.arange(40))
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    # sample i does not depend on which batch it is drawn in
    c = S.ShapesBatches("train", seed=3).batch(np.arange(20, 30))
    assert torch.equal(c["image"], a["image"][20:30]) and c["caption"] == a["caption"][20:30]
    # nor on the Dataset/batch path
    ds = S.ShapesDataset("train", length=40, seed=3)
    assert torch.equal(ds[7]["image"], a["image"][7]) and ds[7]["caption"] == a["caption"][7]
    # another seed or split gives other samples
    d = S.ShapesBatches("train", seed=4).batch(np.arange(40))
    e = S.ShapesBatches("val", seed=3).batch(np.arange(40))
    assert not torch.equal(a["image"], d["image"]) and not torch.equal(a["image"], e["image"])


def test_for_step_partitions_ranks():
    gen = S.ShapesBatches("train", seed=0)
    r0 = gen.for_step(5, 4, rank=0, world=2)["index"].tolist()
    r1 = gen.for_step(5, 4, rank=1, world=2)["index"].tolist()
    nxt = gen.for_step(6, 4, rank=0, world=2)["index"].tolist()
    assert r0 == [40, 41, 42, 43] and r1 == [44, 45, 46, 47] and nxt == [48, 49, 50, 51]


def test_images_shape_range_and_plain_background():
    d = S.ShapesBatches("val", seed=0).batch(np.arange(64))
    x = d["image"]
    assert x.shape == (64, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # the border is one colour (objects keep a 1-pixel margin)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    assert (border - border[:, :, :1]).abs().max() < 1e-6
    # and the object colour differs clearly from it (>= 100 of 255 in RGB distance)
    for c in S.COLOURS.values():
        for b in S.BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(c, b)) >= 100


CAPTION = re.compile(r"^a( (small|large))? (red|green|blue|yellow|purple|orange|white) "
                     r"(circle|square|triangle)( (on the left|on the right|at the top|"
                     r"at the bottom|in the center))?$")


def test_captions_match_attributes():
    ds = S.ShapesDataset("val", length=300, seed=1)
    forms = set()
    for i in range(len(ds)):
        item = ds[i]
        m = CAPTION.match(item["caption"])
        assert m, item["caption"]
        assert m.group(3) == item["colour"] and m.group(4) == item["shape"]
        if m.group(2):
            assert m.group(2) == item["size"]
        if m.group(6):
            assert m.group(6).split()[-1] == item["position"]
        forms.add((m.group(2) is not None, m.group(6) is not None))
        assert set(item["caption"].split()) <= set(S.vocabulary())
    assert len(forms) == 4  # with and without size, with and without position


def test_heldout_pairs_never_in_training_split():
    d = S.ShapesBatches("train", seed=0).batch(np.arange(5000))
    seen = set(zip(d["colour"], d["shape"]))
    assert not seen & set(S.HELDOUT)
    assert len(seen) == 7 * 3 - len(S.HELDOUT)  # every other pair does occur
    for cap in d["caption"]:
        for colour, shape in S.HELDOUT:
            assert f"{colour} {shape}" not in cap
    h = S.ShapesBatches("heldout", seed=0).batch(np.arange(300))
    assert set(zip(h["colour"], h["shape"])) == set(S.HELDOUT)


def test_attributes_cover_sizes_and_positions():
    ds = S.ShapesDataset("train", length=400, seed=0)
    items = [ds[i] for i in range(len(ds))]
    assert {it["size"] for it in items} == set(S.SIZES)
    assert {it["position"] for it in items} == set(S.POSITIONS)
    assert {it["background"] for it in items} == set(S.BACKGROUNDS)
    # "left" objects are left of "right" ones, "top" above "bottom"
    attrs = S.attributes(np.arange(400), 0, "train")
    pos = attrs["position"]
    assert attrs["cx"][pos == 0].max() < attrs["cx"][pos == 1].min()
    assert attrs["cy"][pos == 2].max() < attrs["cy"][pos == 3].min()


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_judge_is_right_on_clean_data(split):
    d = S.ShapesBatches(split, seed=7).batch(np.arange(1000))
    got = S.judge_batch(d["image"])
    want = list(zip(d["colour"], d["shape"]))
    wrong = [(g, w) for g, w in zip(got, want) if g != w]
    assert not wrong, f"{len(wrong)} of {len(want)} judged wrong, e.g. {wrong[:3]}"


def test_judge_reads_pil_and_survives_mild_noise():
    from ldmfast.images import to_pil
    d = S.ShapesBatches("val", seed=2).batch(np.arange(200))
    pil = to_pil(d["image"][:20])
    assert [S.judge(p) for p in pil] == list(zip(d["colour"][:20], d["shape"][:20]))
    g = torch.Generator().manual_seed(0)
    noisy = (d["image"] + 0.06 * torch.randn(d["image"].shape, generator=g)).clamp(-1, 1)
    got = S.judge_batch(noisy)
    acc = np.mean([a == b for a, b in zip(got, zip(d["colour"], d["shape"]))])
    assert acc >= 0.95, acc


def test_judge_says_none_for_a_blank_image():
    assert S.judge(torch.full((3, 64, 64), -0.5)) == ("none", "none")


def test_judge_says_none_for_noise_and_scattered_blobs():
    """What an untrained model draws is never read as a shape: white noise, smooth noise (an
    upsampled 16x16 grid, like a decoded random latent), two objects of different colours."""
    g = torch.Generator().manual_seed(0)
    white = torch.rand(20, 3, 64, 64, generator=g) * 2 - 1
    smooth = torch.nn.functional.interpolate(torch.randn(20, 3, 16, 16, generator=g), size=64,
                                             mode="bilinear").clamp(-1, 1)
    assert set(S.judge_batch(white)) == {("none", "none")}
    assert set(S.judge_batch(smooth)) == {("none", "none")}
    two = torch.full((3, 64, 64), -0.5)
    two[:, 5:20, 5:20] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]    # red
    two[:, 40:60, 40:60] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]  # blue
    assert S.judge(two) == ("none", "none")
