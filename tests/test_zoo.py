"""Model zoo: packaged weights, and every download path exercised on checkpoints the tests write."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from report_builder.data.images import load_images
from report_builder.errors import UserError
from report_builder.models.outputs import class_probabilities
from report_builder.spec.schema import ImagesSpec, ModelSpec
from report_builder.data.classes import places365_classes
from report_builder.models.zoo import PLACES365_URL, get_layer, load_model

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def chelsea():
    return load_images(ImagesSpec(source="samples", names=("chelsea",)))[0]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_weights_see_a_cat(name, chelsea):
    m = load_model(ModelSpec(id="m", source="packaged", name=name), "models[0]")
    assert m.target_layer == "blocks"
    crop = m.preprocess.crop(chelsea.image)
    assert crop.shape == (m.preprocess.input_size, m.preprocess.input_size, 3)
    probs = class_probabilities(m, crop[None], torch.device("cpu"))[0]
    assert m.class_names[int(probs.argmax())] in CAT_CLASSES
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_torchvision_loads_from_its_cache_without_network(tmp_path):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    planted = torchvision.models.resnet18()
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(planted.state_dict(), dest)
    m = load_model(ModelSpec(id="r18", source="torchvision", name="resnet18", weights="IMAGENET1K_V1"), "models[0]")
    assert m.target_layer == "layer4"
    assert m.class_names[281] == "tabby"
    assert torch.equal(m.module.state_dict()["fc.weight"], planted.state_dict()["fc.weight"])


def test_torchvision_download_failure_says_where_to_put_the_file(tmp_path):
    with pytest.raises(UserError) as exc:
        load_model(ModelSpec(id="r18", source="torchvision", name="resnet18"), "models[2]")
    msg = str(exc.value)
    assert "models[2]" in msg and "resnet18-f37072fd.pth" in msg and "checkpoints" in msg and "models[2].path" in msg


def _csail_checkpoint(path: Path, arch: str = "resnet18") -> dict:
    """A checkpoint in the CSAIL Places365 format: a dict with a `module.`-prefixed state_dict."""
    torch.manual_seed(1)
    net = torchvision.models.get_model(arch, num_classes=365)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "best_prec1": 54.7}, path)
    return net.state_dict()


def test_places365_from_local_path(tmp_path):
    planted = _csail_checkpoint(tmp_path / "resnet18_places365.pth.tar")
    m = load_model(ModelSpec(id="p", source="places365", name="resnet18", path=str(tmp_path / "resnet18_places365.pth.tar")), "models[1]")
    assert len(m.class_names) == 365 and m.class_names[0] == "airfield"
    assert torch.equal(m.module.state_dict()["conv1.weight"], planted["conv1.weight"])
    assert m.target_layer == "layer4"


def test_places365_download_path_uses_hub_cache(tmp_path):
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(PLACES365_URL.format(arch="resnet18")).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    _csail_checkpoint(dest)
    m = load_model(ModelSpec(id="p", source="places365", name="resnet18"), "models[0]")
    assert m.module.fc.out_features == 365


def test_places365_download_failure_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"resnet18_places365\.pth\.tar.*\n.*models\[0\]\.path"):
        load_model(ModelSpec(id="p", source="places365", name="resnet18"), "models[0]")


def test_places365_categories_are_the_365_csail_names():
    names = places365_classes()
    assert len(names) == 365 and len(set(names)) == 365
    assert names[312:315] == ["stadium/baseball", "stadium/football", "stadium/soccer"]


def test_timm_checkpoint_via_path(tmp_path):
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "r10t.pth")
    m = load_model(ModelSpec(id="t", source="timm", name="resnet10t", path=str(tmp_path / "r10t.pth")), "models[0]")
    assert m.target_layer == "layer4"
    assert m.weights_hash and len(m.class_names) == 1000


def test_checkpoint_source_with_class_file_and_wrapped_state(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    net = torchvision.models.resnet18(num_classes=2)
    torch.save({"model": net.state_dict()}, tmp_path / "two.pt")
    m = load_model(ModelSpec(id="c", source="checkpoint", name="resnet18", path=str(tmp_path / "two.pt"), classes=str(tmp_path / "classes.txt")), "models[0]")
    assert m.class_names == ["cat", "dog"]


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "ten.pt")
    with pytest.raises(UserError, match=r"models\[0\]: checkpoint .*ten\.pt does not fit"):
        load_model(ModelSpec(id="c", source="checkpoint", name="resnet18", path=str(tmp_path / "ten.pt")), "models[0]")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"models\[0\]: cannot load checkpoint"):
        load_model(ModelSpec(id="c", source="checkpoint", name="resnet18", path=str(tmp_path / "bad.pt")), "models[0]")


def test_unknown_layer_lists_closest_names(tmp_path):
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r.pt")
    m = load_model(ModelSpec(id="c", source="checkpoint", name="resnet18", path=str(tmp_path / "r.pt")), "models[0]")
    assert get_layer(m, "layer4", "x") is m.module.layer4
    with pytest.raises(UserError) as exc:
        get_layer(m, "layer5", "models[0].target_layer")
    msg = str(exc.value)
    assert "models[0].target_layer: found 'layer5'" in msg and "layer4" in msg


def test_weights_hash_follows_content_not_name(tmp_path):
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        net.fc.bias[0] += 1.0
    torch.save(net.state_dict(), tmp_path / "b.pt")
    ha = load_model(ModelSpec(id="a", source="checkpoint", name="resnet18", path=str(tmp_path / "a.pt")), "m").weights_hash
    hb = load_model(ModelSpec(id="a", source="checkpoint", name="resnet18", path=str(tmp_path / "b.pt")), "m").weights_hash
    assert ha != hb


def test_sample_images_are_real_photos():
    images = load_images(ImagesSpec(source="samples"))
    assert len(images) >= 10
    assert len({im.sha256 for im in images}) == len(images)
    for im in images:
        arr = np.asarray(im.image)
        assert arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 200 and arr.std() > 10


def test_sklearn_photos_are_the_pixels_sklearn_returns():
    """They are read straight from sklearn's files (importing sklearn costs 2 s): the same pixels as its loader."""
    from sklearn.datasets import load_sample_image

    from report_builder.data.images import SAMPLES

    for name, file in (("china", "china.jpg"), ("flower", "flower.jpg")):
        ours, theirs = SAMPLES[name][1](), load_sample_image(file)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UserError, match=r"images: cannot read image .*(broken\.jpg|ok\.png)"):
        load_images(ImagesSpec(source="folder", path=str(tmp_path)))


def test_empty_image_folder_and_unmatched_glob(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        load_images(ImagesSpec(source="folder", path=str(tmp_path / ".")))
    with pytest.raises(UserError, match="matches no files"):
        load_images(ImagesSpec(source="glob", pattern=str(tmp_path / "*.png")))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_the_batchnorm_folded_copy_gives_the_models_outputs(name, chelsea, tmp_path):
    import dataclasses

    from torch import nn

    if name == "resnet18":
        torch.manual_seed(0)
        net = torchvision.models.resnet18()
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics a trained net has
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.data.uniform_(-0.2, 0.2)
        torch.save(net.state_dict(), tmp_path / "r.pt")
        spec = ModelSpec(id="m", source="checkpoint", name="resnet18", path=str(tmp_path / "r.pt"))
    else:
        spec = ModelSpec(id="m", source="packaged", name=name)
    m = load_model(spec, "models[0]")
    batchnorms = [n for n, x in m.outputs.named_modules() if isinstance(x, nn.BatchNorm2d)]
    assert m.outputs is not m.module and batchnorms == []  # every one of them follows a convolution
    x = m.preprocess.normalize(m.preprocess.crop(chelsea.image)[None])
    with torch.inference_mode():
        plain, fast = m.module(x), m.outputs(x)
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))
    assert int(fast.argmax()) == int(plain.argmax())
    # a model whose module was swapped (the sanity check randomises a copy) never runs the stale folded copy
    assert dataclasses.replace(m, module=torchvision.models.resnet18().eval()).outputs is not m.outputs


def test_a_convolution_that_feeds_more_than_its_batchnorm_is_not_folded():
    from torch import nn

    from report_builder.models.zoo import fast_copy

    class Shared(nn.Module):  # the convolution's output goes to the BatchNorm and around it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((self.bn(y) + y).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Shared().eval()
    net.bn.running_mean.uniform_(-1, 1)
    assert fast_copy(net, 16, "cpu") is None


def test_our_score_cam_on_a_folded_model_equals_grad_cam(chelsea):
    from report_builder.explanation.methods import PACKAGE_CAMS, ExplainSettings, score_cam
    from report_builder.spec.schema import ExplainSpec

    m = load_model(ModelSpec(id="m", source="packaged", name="efficientnet_lite0", target_layer="blocks.5"), "m")
    assert m.outputs is not m.module
    crop = m.preprocess.crop(chelsea.image)
    s = ExplainSettings(ExplainSpec(), 0, torch.device("cpu"))
    ours, reference = score_cam(m, crop, 281, s)["map"], PACKAGE_CAMS["scorecam"](m, crop, 281, s)["map"]
    assert np.abs(ours - reference).max() < 1e-5


def test_hooks_record_the_same_activations_on_the_folded_copy(chelsea):
    from report_builder.dissection.activations import record
    from report_builder.data.probe import ProbeItem, ProbeSet

    m = load_model(ModelSpec(id="m", source="packaged", name="efficientnet_lite0"), "models[0]")
    blocks, conv = ["blocks.4", "blocks.5.0.bn1"], ["blocks.4", "blocks.5.0.conv_pw"]
    assert m.recording(blocks)[0] is m.outputs  # a block's and a BatchNorm's outputs are the same there
    assert m.recording(conv)[0] is m.module  # a convolution's output would include its BatchNorm: not folded
    pixels = np.asarray(chelsea.image)
    probe = ProbeSet("test", tuple(ProbeItem(i, "0", pixels=pixels) for i in "abc"))
    for layers in (blocks, conv):
        fast = record(m, layers, probe, "mean", torch.device("cpu"), 2, "models[0]")
        m_plain = load_model(ModelSpec(id="m", source="packaged", name="efficientnet_lite0"), "models[0]")
        m_plain.folded = (m_plain.module, None, frozenset())  # as for a model with nothing to fold
        plain = record(m_plain, layers, probe, "mean", torch.device("cpu"), 2, "models[0]")
        for name in layers:
            assert torch.allclose(fast[name], plain[name], rtol=1e-4, atol=1e-4 * float(plain[name].abs().max()))
