"""CLIP-Dissect: similarity functions by hand, planted ground truth, the CLIP scorer's loading path, caching."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import wrap
from report_builder.__main__ import main
from report_builder.dissection.activations import record
from report_builder.data.concepts import load_concepts
from report_builder.dissection.clip_dissect import label_units
from report_builder.errors import UserError
from report_builder.data.probe import load_probe
from report_builder.data.colors import color_fractions
from report_builder.dissection.scorers.clip import clip_scores
from report_builder.dissection.similarity import SIMILARITIES
from report_builder.spec.schema import ProbeSpec, ScorerSpec

CPU = torch.device("cpu")
SIMILARITY = {name: s.function for name, s in SIMILARITIES.items()}  # name -> f(P, A, **params)


def close(S: torch.Tensor, expected, atol: float = 1e-6) -> bool:
    return np.allclose(S.numpy(), np.array(expected, dtype=np.float64), atol=atol, rtol=0)


def test_registry_names():
    assert set(SIMILARITY) == {"soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed", "rank_reorder",
                               "linear_explanation"}


def _pmi_by_hand(log_p_c_given_k, lam):
    K = len(log_p_c_given_k)
    C = len(log_p_c_given_k[0])
    log_p_c = [math.log(sum(math.exp(log_p_c_given_k[k][c]) for k in range(K)) / K) for c in range(C)]
    return [[log_p_c_given_k[k][c] - lam * log_p_c[c] for c in range(C)] for k in range(K)]


# Two images, two concepts, two units; unit 0 fires on image 0, unit 1 on image 1.
P2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
A2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_soft_wpmi_by_hand():
    e = math.e
    pt = [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]  # softmax of a*P with a = 1
    p0 = 0.998  # rank 0 of top_k = 1
    lpck = [[math.log(1 + p0 * (pt[k][c] - 1) + 1e-7) for c in range(2)] for k in range(2)]
    expected = _pmi_by_hand(lpck, lam=1.0)
    S = SIMILARITY["soft_wpmi"](P2, A2, top_k=1, a=1.0, lam=1.0)
    assert close(S, expected, 1e-5)
    assert label_units(S, ["cat", "dog"], ["s", "s"])[1].label == "dog"


def test_soft_wpmi_second_rank_weight():
    # top_k = 2: the second-ranked image counts with p_1 = 0.998 - (1/2)(0.998 - 0.97) = 0.984
    P = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    A = torch.tensor([[3.0], [1.0], [2.0]])  # top images: 0 then 2
    pt = torch.softmax(10 * P, dim=1)
    lp = [math.log(1 + 0.998 * (pt[0, c].item() - 1) + 1e-7) + math.log(1 + 0.984 * (pt[2, c].item() - 1) + 1e-7)
          for c in range(2)]
    S = SIMILARITY["soft_wpmi"](P, A, top_k=2)
    # one unit: log p(c) = log p(c|k), so S = (1 - lam) log p(c|k) = 0 with lam = 1; check lam = 0.5 instead
    S_half = SIMILARITY["soft_wpmi"](P, A, top_k=2, lam=0.5)
    assert close(S, [[0.0, 0.0]], 1e-6)
    assert close(S_half, [[0.5 * lp[0], 0.5 * lp[1]]], 1e-5)


def test_wpmi_by_hand():
    a, lam = 2.0, 0.6
    pt = torch.softmax(a * P2, dim=1).tolist()
    lpck = [[math.log(pt[k][c] + 1e-7) for c in range(2)] for k in range(2)]
    expected = _pmi_by_hand(lpck, lam)
    S = SIMILARITY["wpmi"](P2, A2, top_k=1)
    assert close(S, expected, 1e-5)


def test_cos_similarity_by_hand():
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    A = torch.tensor([[1.0], [1.0], [0.0]])
    S = SIMILARITY["cos_similarity"](P, A)
    # <(1,1,0),(1,0,1)> / (sqrt2 sqrt2) = 0.5 for both concepts
    assert close(S, [[0.5, 0.5]])


def test_cos_similarity_cubed_by_hand():
    P = torch.tensor([[1.0], [2.0], [3.0]])  # centred (-1, 0, 1), cubed the same, norm sqrt2
    A = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    S = SIMILARITY["cos_similarity_cubed"](P, A)
    assert close(S, [[-1.0], [1.0]], 1e-6)
    # a flat column has norm 0: divided by min_norm instead of 0, giving 0, not NaN
    flat = SIMILARITY["cos_similarity_cubed"](P, torch.ones(3, 1))
    assert flat.tolist() == [[0.0]]


def test_rank_reorder_relations():
    # 60 images, top 5% = 3 images: activations 3, 2, 1 on images 0, 1, 2
    A = torch.zeros(60, 1)
    A[0, 0], A[1, 0], A[2, 0] = 3.0, 2.0, 1.0
    P = torch.full((60, 3), 0.01)
    P[:3, 0] = torch.tensor([0.9, 0.5, 0.1])  # same order as the activations: no reordering error
    P[:3, 1] = torch.tensor([0.1, 0.5, 0.9])  # reversed
    P[:3, 2] = 4 * P[:3, 1]  # the same ranks with a 4x higher mean: error divided by 4^0.5
    S = SIMILARITY["rank_reorder"](P, A)[0]
    assert S[0].item() == 0.0
    assert S[1].item() < 0
    assert S[2].item() == pytest.approx(S[1].item() / 2, rel=1e-5)


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed", "linear_explanation"])
def test_planted_concepts_are_recovered(name):
    """Units built to fire on known concepts, and a scorer whose matrix is known: the labels come back."""
    g = torch.Generator().manual_seed(0)
    n_images, n_concepts, n_units = 600, 40, 120
    present = (torch.rand(n_images, n_concepts, generator=g) < 0.1).float()
    P = 0.2 + 0.08 * present + 0.01 * torch.randn(n_images, n_concepts, generator=g)  # CLIP-like cosines
    planted = torch.arange(n_units) % n_concepts
    A = present[:, planted] + 0.3 * torch.randn(n_images, n_units, generator=g)
    S = SIMILARITY[name](P, A, **({"top_k": 50} if "wpmi" in name else {}))
    recovered = (S.argmax(dim=1) == planted).float().mean().item()
    assert recovered >= 0.95


def test_soft_wpmi_vectorised_matches_a_per_unit_loop():
    g = torch.Generator().manual_seed(1)
    P, A = torch.rand(80, 30, generator=g), torch.randn(80, 12, generator=g)
    S = SIMILARITY["soft_wpmi"](P, A, top_k=10)
    Pt = torch.softmax(10 * P, dim=1)
    p_r = 0.998 - torch.arange(10) / 10 * (0.998 - 0.97)
    rows = []
    for k in range(12):
        top = torch.topk(A[:, k], 10).indices
        rows.append(torch.log(1 + p_r[:, None] * (Pt[top] - 1) + 1e-7).sum(0))
    lpck = torch.stack(rows)
    expected = lpck - (torch.logsumexp(lpck, 0, keepdim=True) - math.log(12))
    assert torch.allclose(S, expected, atol=1e-4)


class ColourUnits(nn.Module):
    """Five units that respond to red, green, blue, white and black pixels: a planted model."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 5, 1)
        w = torch.tensor([[1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1], [1 / 3] * 3, [-1 / 3] * 3])
        with torch.no_grad():
            self.features.weight.copy_(w.view(5, 3, 1, 1))
            self.features.bias.copy_(torch.tensor([0, 0, 0, 0, 1.0]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


def colour_probe(folder: Path, n: int = 60) -> None:
    rgb = {"red": (220, 20, 20), "green": (20, 150, 20), "blue": (20, 20, 220), "white": (245, 245, 245),
           "black": (10, 10, 10), "yellow": (240, 230, 20)}
    rng = np.random.default_rng(0)
    folder.mkdir()
    names = list(rgb)
    for i in range(n):
        base, other = rng.choice(len(names), size=2, replace=False)
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = rgb[names[base]]
        img[:, 24:] = rgb[names[other]]  # a quarter of another colour
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def test_planted_colour_units_through_probe_scorer_and_activations(tmp_path):
    colour_probe(tmp_path / "probe")
    model = wrap(ColourUnits(), classes=2)
    model.layer_names.append("features")
    probe = load_probe(ProbeSpec(source="folder", path=str(tmp_path / "probe")), seed=0)
    acts = record(model, ["features"], probe, "avg", CPU, 16, "models[0]")
    from report_builder.dissection.scorers.colors import colors_scores
    from report_builder.data.concepts import BRODEN_COLORS

    P = colors_scores(probe)
    S = SIMILARITY["soft_wpmi"](P, acts["features"], top_k=10)
    labels = [u.label for u in label_units(S, list(BRODEN_COLORS), ["colors"] * 11)]
    assert labels == ["red", "green", "blue", "white", "black"]


def test_color_fractions_of_a_two_colour_image():
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :7] = (250, 0, 0)
    img[:, 7:] = (0, 0, 250)
    from report_builder.data.concepts import BRODEN_COLORS

    frac = dict(zip(BRODEN_COLORS, color_fractions(img)))
    assert frac["red"] == pytest.approx(0.7) and frac["blue"] == pytest.approx(0.3)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_clip_scorer_loads_a_local_checkpoint_through_the_real_path(tmp_path):
    import open_clip

    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-clip-test").eval()
    torch.save(reference.state_dict(), tmp_path / "tiny.pt")
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "probe").mkdir()
    for i in range(4):
        (tmp_path / f"{i}.png").rename(tmp_path / "probe" / f"{i}.png")
    probe = load_probe(ProbeSpec(source="folder", path=str(tmp_path / "probe")), seed=0)
    spec = ScorerSpec(kind="clip", model="tiny-clip-test", config=str(tmp_path / "tiny-clip-test.json"),
                      path=str(tmp_path / "tiny.pt"), pretrained=None)
    concepts = ["cat", "dog", "red"]
    P = clip_scores(spec, concepts, probe, CPU, 2, "dissect.scorers[0]")
    assert P.shape == (4, 3)

    _, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test")
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(tmp_path / "probe" / f"{i}.png").convert("RGB")) for i in range(4)])
        img = torch.nn.functional.normalize(reference.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(reference.encode_text(open_clip.get_tokenizer("tiny-clip-test")(concepts)), dim=-1)
    assert torch.allclose(P, img @ txt.T, atol=1e-5)


def test_a_probe_shard_is_decoded_once_for_clip_the_models_and_the_colours(tmp_path, monkeypatch, tiny_model):
    import dataclasses

    import open_clip

    from report_builder.data import probe as probe_module
    from report_builder.dissection.scorers.clip import clip_image_embeddings, split_preprocess
    from report_builder.dissection.scorers.colors import COLOR_VIEW, color_table

    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test")
    clip.eval()
    rng = np.random.default_rng(0)
    (tmp_path / "probe").mkdir()
    for i in range(5):  # JPEGs and PNGs of different sizes and shapes
        pic = Image.fromarray(rng.integers(0, 255, (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3), np.uint8))
        pic.save(tmp_path / "probe" / f"{i}.{'jpg' if i % 2 else 'png'}")
    probe = load_probe(ProbeSpec(source="folder", path=str(tmp_path / "probe")), seed=0)
    clip_cut = split_preprocess(preprocess)[0]
    twin = dataclasses.replace(tiny_model.preprocess, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # same cut
    opened = []
    decode = probe_module.open_image
    monkeypatch.setattr(probe_module, "open_image", lambda path, where: opened.append(path) or decode(path, where))

    pixels = probe_module.pixels_task(probe, [clip_cut, tiny_model.preprocess, twin, COLOR_VIEW])
    assert len(opened) == 5 and len(pixels) == 3  # each file decoded once; the twin model shares the first's cut
    # each reader gets exactly what it computed when it decoded the probe by itself
    shared = clip_image_embeddings(clip, preprocess, pixels[clip_cut.key], "cpu", 2)
    assert np.array_equal(shared, clip_image_embeddings(clip, preprocess, probe, "cpu", 2))
    acts = record(tiny_model, ["features"], pixels[twin.key], "avg", CPU, 2, "m")["features"]
    assert torch.equal(acts, record(tiny_model, ["features"], probe, "avg", CPU, 2, "m")["features"])
    assert np.array_equal(color_table(pixels[COLOR_VIEW.key]), color_table(probe))


def test_clip_without_weights_names_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # as on a machine configured offline: the hub fails at once instead of retrying for a minute
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = ScorerSpec(kind="clip", model="ViT-B-16", pretrained="openai")
    probe = load_probe(ProbeSpec(source="samples-augmented", per_image=1), seed=0)
    with pytest.raises(UserError, match=r"dissect.scorers\[0\]: could not load CLIP ViT-B-16.*\n.*dissect.scorers\[0\].path"):
        clip_scores(spec, ["cat"], probe, CPU, 2, "dissect.scorers[0]")


def test_activation_identity_follows_weights_layers_probe_and_pooling(tiny_model):
    from report_builder.dissection.activations import identity
    from report_builder.pipeline.cache import key_of
    from report_builder.models.zoo import weights_hash

    probe = load_probe(ProbeSpec(source="samples-augmented", per_image=1), seed=0)
    other_probe = load_probe(ProbeSpec(source="samples-augmented", per_image=1), seed=1)
    base = key_of(identity(tiny_model, ["features"], probe, "avg"))
    assert base == key_of(identity(tiny_model, ["features"], probe, "avg"))
    assert base != key_of(identity(tiny_model, ["features.0"], probe, "avg"))
    assert base != key_of(identity(tiny_model, ["features"], other_probe, "avg"))
    assert base != key_of(identity(tiny_model, ["features"], probe, "max"))
    with torch.no_grad():
        tiny_model.module.features[0].bias += 1.0
    tiny_model.weights_hash = weights_hash(tiny_model.module)
    assert base != key_of(identity(tiny_model, ["features"], probe, "avg"))


def test_pooling_max_and_avg_differ(tmp_path, tiny_model):
    probe = load_probe(ProbeSpec(source="samples-augmented", per_image=1), seed=0)
    avg = record(tiny_model, ["features"], probe, "avg", CPU, 8, "m")["features"]
    mx = record(tiny_model, ["features"], probe, "max", CPU, 8, "m")["features"]
    assert avg.shape == mx.shape == (12, 8) and (mx >= avg - 1e-6).all()


def test_probe_sets(tmp_path):
    aug = load_probe(ProbeSpec(source="samples-augmented", per_image=3), seed=0)
    again = load_probe(ProbeSpec(source="samples-augmented", per_image=3), seed=0)
    assert len(aug) == 36 and aug.manifest == again.manifest
    assert load_probe(ProbeSpec(source="samples-augmented", per_image=3), seed=1).manifest != aug.manifest
    colour_probe(tmp_path / "imgs", n=10)
    (tmp_path / "list.txt").write_text("imgs/000.png\nimgs/001.png\n")
    assert len(load_probe(ProbeSpec(source="list", path=str(tmp_path / "list.txt")), seed=0)) == 2
    sub = load_probe(ProbeSpec(source="folder", path=str(tmp_path / "imgs"), limit=4), seed=0)
    assert len(sub) == 4 and [i.id for i in sub.items] == sorted(i.id for i in sub.items)
    broden = tmp_path / "broden"
    (broden / "images" / "ade").mkdir(parents=True)
    (tmp_path / "imgs" / "000.png").rename(broden / "images" / "ade" / "a.png")
    (broden / "index.csv").write_text("image,split,color\nade/a.png,train,ade/a_color.png\n")
    assert [i.id for i in load_probe(ProbeSpec(source="broden", path=str(tmp_path / "broden")), seed=0).items] == ["ade/a.png"]


def test_bad_probe_folder_and_empty_concept_file(tmp_path):
    with pytest.raises(UserError, match=r"dissect.probe.path: probe folder .*nowhere does not exist"):
        load_probe(ProbeSpec(source="folder", path=str(tmp_path / "nowhere")), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_probe(ProbeSpec(source="folder", path=str(tmp_path / "empty")), seed=0)
    with pytest.raises(UserError, match="not a Broden-style folder"):
        load_probe(ProbeSpec(source="broden", path=str(tmp_path / "empty")), seed=0)
    (tmp_path / "none.txt").write_text("\n# only a comment\n")
    with pytest.raises(UserError, match=r"dissect.concepts\[1\]: concept file .*none.txt is empty"):
        load_concepts(("broden-colors", str(tmp_path / "none.txt")))


def test_concept_sets_are_cleaned_and_deduplicated(tmp_path):
    (tmp_path / "mine.txt").write_text("Red\nstriped\nsea_shore\n")
    words = load_concepts(("broden-colors", "dtd-textures", str(tmp_path / "mine.txt")))
    assert len(words) == 11 + 47 + 1 and words[-1] == "sea shore"
    big = load_concepts(("words-20k",))
    assert 10_000 < len(big) <= 20_000 and "the" not in big and len(set(big)) == len(big)
    assert "arena hockey" in load_concepts(("places365",))


def test_unknown_layer_in_spec_is_reported_before_any_work(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("""
models:
  - {id: m, source: packaged, name: efficientnet_lite0, layers: [blocks.5, blocks.9]}
images: {source: samples, names: [coffee]}
dissect:
  probe: {source: folder, path: missing}
  scorers: [colors]
""")
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "models[0].layers[1]: found 'blocks.9'" in err and "blocks.6" in err
    assert "dissect.probe.path: probe folder" in err  # both problems in one message
    assert not (tmp_path / "out").exists()


def test_truncated_text_encoding_equals_the_full_context(tmp_path):
    import open_clip

    from report_builder.dissection.scorers.clip import encode_texts

    (tmp_path / "tiny-clip-trunc.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-clip-trunc.json")
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-clip-trunc").eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip-trunc")
    words = ["cat", "a photo of a dog", "striped", "sea shore", "the quick brown fox jumps over the lazy dog", "red"]
    fast = encode_texts(model, tokenizer, words, CPU, batch_size=4)
    full = encode_texts(model, tokenizer, words, CPU, batch_size=4, truncate=False)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model.encode_text(tokenizer(words)), dim=-1)
    assert torch.allclose(full, reference, atol=1e-5)
    assert torch.allclose(fast, reference, atol=1e-4)
