"""The one forward-hook recorder: every stage that reads a layer's output (activations, Network Dissection, the
explanations, the zoo's layout and BatchNorm probes) records it with `LayerRecorder`."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

Keep = Callable[[str, nn.Module, tuple, Any], Any]  # (name, layer, its inputs, its output) -> what is recorded


class LayerRecorder:
    """Forward hooks on named layers, as a context manager, removed on leaving it even when the forward pass raises.

    Each time a layer runs, `keep(name, layer, inputs, output)` (default: the output itself) becomes `latest[name]`; with
    `history=True` every call is also appended to `calls` as (name, value), in the order the layers ran, for layers
    that run more than once per pass or for a record over many batches::

        with LayerRecorder({"layer4": model.layer4}) as rec:
            logits = model(x)
        features = rec.latest["layer4"]
    """

    def __init__(self, layers: Mapping[str, nn.Module], keep: Keep | None = None, history: bool = False):
        self.layers = dict(layers)
        self.keep = keep
        self.history = history
        self.latest: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []
        self._handles: list = []

    def values(self, name: str) -> list:
        """Every value recorded for `name`, in order (with history=True)."""
        return [v for n, v in self.calls if n == name]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            value = output if self.keep is None else self.keep(name, module, inputs, output)
            self.latest[name] = value
            if self.history:
                self.calls.append((name, value))
        return hook

    def __enter__(self) -> LayerRecorder:
        try:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Take every hook off its layer (what leaving the `with` block does)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
