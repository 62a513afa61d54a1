"""Code in a spec and the user's own model code (source: python), as a hostile tester found them.

A: a spec that names Python code is announced and refused unless the user allows it; a factory file must lie in
the spec's folder (or under --allow-code-from), and the standard library is never a factory.
B: whatever the user's factory returns is checked like any input: a clear error (exit 2) naming the key, never a
traceback, an exit or a silently wrong model; tuple and dict outputs are cut down to their logits.
C: what `run` would refuse, `validate` refuses too: a CAM target layer with no map; a bool schema_version.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from report_builder.__main__ import main
from report_builder.errors import UserError

NET = '''
import math
import torch
from torch import nn


class Net(nn.Module):
    """A few convolutions and a head: fast at 32 x 32."""

    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.body(x))


PRE = {"input_size": 32, "resize_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
NAMES = ["cat", "dog", "car", "tree"]


def made(model=None, **changes):
    torch.manual_seed(0)
    out = {"model": model if model is not None else Net(), "classes": NAMES, "preprocess": dict(PRE)}
    for key, value in changes.items():
        if key.startswith("pre_"):
            out["preprocess"][key[4:]] = value
        else:
            out[key] = value
    return out
'''

SPEC = """
models:
  - {{id: mine, source: python, factory: "{factory}"{extra}}}
images: {{source: samples, names: [chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: 10, batch_size: 10}}}}
"""


def setup(folder: Path, body: str, factory: str = "model.py:build", extra: str = "", name: str = "model.py") -> Path:
    """A factory file (NET plus `body`) and a spec beside it; returns the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(NET + body)
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(factory=factory, extra=extra))
    return spec


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err


def refused(capsys, spec: Path, out: Path, *flags, expected: tuple[str, ...]) -> str:
    """validate and run both exit 2 with a message holding every `expected` text; run writes nothing."""
    for command in ("validate", "run"):
        argv = [command, spec, *flags] + (["--out", out] if command == "run" else [])
        code, stdout, err = cli(capsys, *argv)
        assert code == 2, (command, stdout, err)
        for text in expected:
            assert text in err, (command, text, err)
        assert "ok" not in stdout
    assert not out.exists()
    return err


# ---------------------------------------------------------------- A: code runs only when allowed

MARKER = '''
import pathlib
pathlib.Path(__file__).with_name("imported.marker").write_text("imported")


def build():
    pathlib.Path(__file__).with_name("called.marker").write_text("called")
    return made()
'''


def test_code_is_announced_and_refused_without_allow_code(tmp_path, capsys):
    spec = setup(tmp_path, MARKER)
    file = str((tmp_path / "model.py").resolve())
    for quiet in ([], ["-q"]):
        for command in ("validate", "run"):
            argv = [*quiet, command, spec] + (["--out", tmp_path / "out"] if command == "run" else [])
            code, stdout, err = cli(capsys, *argv)
            assert code == 2 and "ok" not in stdout
            assert f"note: models[0].factory: this spec runs Python code: build() from {file}" in err
            assert f"models[0].factory: the spec runs Python code from {file}" in err and "--allow-code" in err
    assert not (tmp_path / "imported.marker").exists() and not (tmp_path / "called.marker").exists()
    assert not (tmp_path / "out").exists()
    code, stdout, err = cli(capsys, "validate", spec, "--allow-code")
    assert code == 0 and "ok" in stdout and file in err
    assert (tmp_path / "called.marker").exists()


def test_a_factory_file_outside_the_specs_folder_needs_its_folder_named(tmp_path, capsys):
    spec = setup(tmp_path / "specs", "", factory="../elsewhere/evil.py:build")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "evil.py").write_text(NET + MARKER)
    refused(capsys, spec, tmp_path / "out", "--allow-code",
            expected=(f"models[0].factory: the file {(tmp_path / 'elsewhere' / 'evil.py').resolve()} (build()) is "
                      f"outside the spec's folder {(tmp_path / 'specs').resolve()}",
                      f"--allow-code-from {(tmp_path / 'elsewhere').resolve()}"))
    assert not (tmp_path / "elsewhere" / "imported.marker").exists()
    code, stdout, err = cli(capsys, "validate", spec, "--allow-code-from", tmp_path / "elsewhere")
    assert code == 0 and "ok" in stdout and "evil.py" in err


def test_a_symlink_beside_the_spec_to_a_file_elsewhere_is_elsewhere(tmp_path, capsys):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.py").write_text(NET + MARKER)
    spec = setup(tmp_path / "specs", "", name="unused.py")
    os.symlink(tmp_path / "elsewhere" / "real.py", tmp_path / "specs" / "model.py")
    refused(capsys, spec, tmp_path / "out", "--allow-code", "--allow-code-from", tmp_path / "specs",
            expected=(f"models[0].factory: the file {(tmp_path / 'elsewhere' / 'real.py').resolve()} (build()) is "
                      "outside the spec's folder",))
    assert not (tmp_path / "elsewhere" / "imported.marker").exists()


@pytest.mark.parametrize("factory", ["sys:exit", "builtins:input", "os:getcwd", "os.path:sep", "report_builder:run"])
def test_the_standard_library_is_never_a_factory(tmp_path, capsys, factory):
    spec = setup(tmp_path, "", factory=factory)
    refused(capsys, spec, tmp_path / "out", "--allow-code",
            expected=(f"models[0].factory: found {factory!r}", "a factory must be your own model code"))


def test_an_installed_module_needs_allow_code(tmp_path, capsys, monkeypatch):
    package = tmp_path / "site" / "my_models_rb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NET + MARKER)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = setup(tmp_path / "specs", "", factory="my_models_rb.nets:build", name="unused.py")
    refused(capsys, spec, tmp_path / "out",
            expected=("models[0].factory: the spec runs Python code from the installed module my_models_rb.nets",
                      "--allow-code"))
    assert not (package / "imported.marker").exists()
    code, stdout, err = cli(capsys, "validate", spec, "--allow-code")
    assert code == 0 and "installed module my_models_rb.nets" in err
    sys.modules.pop("my_models_rb.nets", None)
    sys.modules.pop("my_models_rb", None)


def test_the_notebook_api_needs_allow_code_too(tmp_path, capsys):
    from report_builder import run

    spec = setup(tmp_path, MARKER)
    with pytest.raises(UserError, match=r"models\[0\]\.factory: the spec runs Python code"):
        run(spec, tmp_path / "out", quiet=True)
    assert not (tmp_path / "imported.marker").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- B: the factory's results are checked

BAD = {
    "a dict without logits": ('''
class Out(Net):
    def forward(self, x):
        return {"scores": super().forward(x)}

def build():
    return made(Out())
''', ("models[0].factory: the model from", "returns a dict with keys 'scores'", "expected a tensor of N x classes")),
    "a NaN forward": ('''
class Out(Net):
    def forward(self, x):
        return super().forward(x) * math.nan

def build():
    return made(Out())
''', ("models[0].factory: the model from", "not finite (NaN or infinity)")),
    "classes as a number": ('''
def build():
    return made(classes=5)
''', ("models[0].factory → classes: ", "returned 5 (int), expected a list of class names",)),
    "3 names for 10 outputs": ('''
def build():
    return made(Net(10), classes=["a", "b", "c"])
''', ("models[0].factory → classes: ", "returned 3 class names, but the model has 10 outputs")),
    "input_size 0": ('''
def build():
    return made(pre_input_size=0)
''', ("models[0].factory → preprocess.input_size: ", "returned 0, expected a whole number of pixels from 8 to 4096")),
    "mean as text": ('''
def build():
    return made(pre_mean="abc")
''', ("models[0].factory → preprocess.mean: ", "returned 'abc', expected 3 finite numbers")),
    "a bogus interpolation": ('''
def build():
    return made(pre_interpolation="bogus")
''', ("models[0].factory → preprocess.interpolation: ", "returned 'bogus', expected one of 'bilinear'")),
    "std of zero": ('''
def build():
    return made(pre_std=[0.25, 0, 0.25])
''', ("models[0].factory → preprocess.std: ", "expected 3 finite numbers greater than 0")),
    "resize below the crop": ('''
def build():
    return made(pre_resize_size=16)
''', ("models[0].factory → preprocess.resize_size: ", "gives 16, expected at least input_size 32")),
    "a forward that raises": ('''
class Out(Net):
    def forward(self, x):
        raise RuntimeError("no GPU here")

def build():
    return made(Out())
''', ("models[0].factory: the forward pass of the model from", "failed (RuntimeError: no GPU here)")),
    "a factory calling sys.exit(0)": ('''
import sys

def build():
    sys.exit(0)
''', ("models[0].factory: ", "model.py:build() raised SystemExit 0")),
    "a factory raising SystemExit(0)": ('''
def build():
    raise SystemExit(0)
''', ("models[0].factory: ", "model.py:build() raised SystemExit 0")),
    "an import raising SystemExit": ('''
raise SystemExit(3)
''', ("models[0].factory: importing ", "model.py raised SystemExit 3")),
    "KeyboardInterrupt from the factory": ('''
def build():
    raise KeyboardInterrupt
''', ("models[0].factory: ", "model.py:build() raised KeyboardInterrupt")),
    "GeneratorExit from the forward": ('''
class Out(Net):
    def forward(self, x):
        raise GeneratorExit

def build():
    return made(Out())
''', ("models[0].factory: the forward pass", "raised GeneratorExit")),
    "outputs N x 5 x 10": ('''
class Out(Net):
    def forward(self, x):
        return super().forward(x).view(-1, 5, 10)

def build():
    return made(Out(50), classes=[str(i) for i in range(10)])
''', ("models[0].factory: the model from", "gives outputs of shape 2 x 5 x 10", "expected 2 x classes")),
    "a tuple of no tensor": ('''
class Out(Net):
    def forward(self, x):
        return ("logits", super().forward(x))

def build():
    return made(Out())
''', ("models[0].factory: the model from", "returns a tuple whose first item is str")),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_the_factory_and_its_model_are_checked_like_any_input(tmp_path, capsys, case):
    body, expected = BAD[case]
    spec = setup(tmp_path, body)
    err = refused(capsys, spec, tmp_path / "out", "--allow-code", expected=expected)
    assert str((tmp_path / "model.py").resolve()) in err  # the factory named by its file
    assert "interrupted" not in err


TUPLE_AND_DICT = '''
class HuggingFaceLike(Net):
    def forward(self, x):
        return {"logits": super().forward(x), "hidden_states": (x,)}


class TupleLike(Net):
    def forward(self, x):
        return super().forward(x), x.mean()


def hf():
    return made(HuggingFaceLike())


def pair():
    return made(TupleLike())
'''


@pytest.mark.parametrize("function", ["hf", "pair"])
def test_dict_and_tuple_outputs_are_cut_to_their_logits_and_keep_layer_names(tmp_path, capsys, function):
    spec = setup(tmp_path, TUPLE_AND_DICT, factory=f"model.py:{function}", extra=", target_layer: body.2")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "-q", "run", spec, "--allow-code", "--out", out)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    (m,) = r["models"]
    assert m["target_layer"] == "body.2" and m["num_classes"] == 4
    (e,) = r["explanations"]
    assert e["predictions"][0]["class_name"] in {"cat", "dog", "car", "tree"}
    assert set(e["methods"]) == {"gradcam", "lime"}


def test_the_adapter_keeps_the_users_names_weights_and_hash(tmp_path):
    import importlib.util

    import torch

    from report_builder.spec.schema import ModelSpec
    from report_builder.models.zoo import LogitsOf, load_model, weights_hash

    (tmp_path / "model.py").write_text(NET + TUPLE_AND_DICT)
    loaded = load_model(ModelSpec(id="a", source="python", factory=f"{tmp_path}/model.py:hf"), "models[0]")
    assert isinstance(loaded.module, LogitsOf)
    found = importlib.util.spec_from_file_location("plain_net", tmp_path / "model.py")
    plain = importlib.util.module_from_spec(found)
    found.loader.exec_module(plain)
    net = plain.made()["model"].eval()
    assert [n for n, _ in loaded.module.named_modules()] == [n for n, _ in net.named_modules()]
    assert weights_hash(loaded.module) == weights_hash(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-6)
        assert torch.allclose(loaded.outputs(x), net(x), atol=1e-5)  # the BatchNorm-folded copy calls it too


def test_a_float16_model_runs_in_float32_with_a_warning(tmp_path, capsys):
    spec = setup(tmp_path, '''
def build():
    return made(Net().half())
''')
    code, stdout, err = cli(capsys, "validate", spec, "--allow-code")
    assert code == 0 and "ok" in stdout
    assert "warning: models[0].factory: the model from" in err and "holds float16 weights" in err
    assert "converted to float32" in err


# ---------------------------------------------------------------- C: validate refuses what run would

def test_a_classifier_head_as_target_layer_is_refused_by_validate(tmp_path, capsys):
    spec = setup(tmp_path, '''
def build():
    return made()
''', extra=", target_layer: head.2")
    refused(capsys, spec, tmp_path / "out", "--allow-code",
            expected=("models[0].target_layer: found 'head.2', whose output in mine is N x C with no spatial map",
                      "the CAM methods (gradcam) need a feature layer", "e.g. 'body' (the default)"))


def test_a_bool_schema_version_is_refused(tmp_path, capsys):
    spec = setup(tmp_path, "def build():\n    return made()\n")
    spec.write_text("schema_version: true\n" + spec.read_text())
    code, _, err = cli(capsys, "validate", spec, "--allow-code")
    assert code == 2 and "schema_version" in err
