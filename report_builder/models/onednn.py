"""CPU forward passes through oneDNN where torch would send them elsewhere.

On a CPU torch runs fp32 `nn.Linear` (and the projections inside `nn.MultiheadAttention`) through MKL's sgemm, and
a 1x1 convolution with stride 1 through its own im2col path whenever it runs on one thread with a batch under 16 (a
worker process of one thread, at the batches used here). oneDNN, which runs every other convolution, picks its
kernels by the instruction set alone; MKL picks slower ones on AMD processors. On the 2-core AMD EPYC (Zen 4) of
the README, one thread: a ViT-B-16 linear layer 46-77 GFLOP/s through MKL against 70-98 through oneDNN, CLIP's
image tower 1.3 times faster, EfficientNet-Lite2 1.2 times (`make bench BENCH_ARGS="--only forward"` measures it
on the machine at hand).

`route_through_onednn` swaps those modules' classes for subclasses whose forward calls oneDNN directly when the
call is fp32 on the CPU and needs no gradient, and falls back to the parent's forward otherwise (a backward pass,
another dtype or device, an attention call with options the short path does not take). The results are the same
function, rounded differently: the callers compare the outputs once when they route a model (`fast_copy`,
`route_checked`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _short(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """A call oneDNN may take: fp32 on the CPU, and no gradient to record."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(p is not None and p.requires_grad
                                                                      for p in params))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "").reshape(*x.shape[:-1], -1)


class OneDnnLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 1 and _short(x, self.weight, self.bias):
            return _linear(x, self.weight, self.bias)
        return super().forward(x)


class OneDnnConv1x1(nn.Conv2d):
    """A 1x1, stride-1 convolution (torch's heuristic keeps these out of oneDNN on one thread)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and _short(x, self.weight, self.bias):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


class OneDnnAttention(nn.MultiheadAttention):
    """Self-attention with packed projections, no padding mask and no weights asked for (CLIP's towers, most
    vision transformers built on nn.MultiheadAttention): projections through oneDNN, scaled_dot_product_attention
    between them. Any other call is nn.MultiheadAttention's own."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        simple = (query is key and key is value and key_padding_mask is None and not need_weights and not is_causal
                  and not self.training and self._qkv_same_embed_dim and self.bias_k is None
                  and not self.add_zero_attn and query.dim() == 3
                  and (attn_mask is None or attn_mask.dim() == 2)
                  and _short(query, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight))
        if not simple:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, width = x.shape
        heads = self.num_heads
        qkv = _linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = may not attend; SDPA: True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = _linear(out.transpose(1, 2).reshape(batch, tokens, width), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _route(m: nn.Module) -> type | None:
    kind = type(m)
    if kind is nn.Linear:
        return OneDnnLinear
    if kind is nn.MultiheadAttention:
        return OneDnnAttention
    if (kind is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple)):
        return OneDnnConv1x1
    return None


def route_through_onednn(module: nn.Module) -> list[tuple[nn.Module, type]]:
    """Swap, in place, the classes of `module`'s linear layers, attention and 1x1 convolutions for their oneDNN
    subclasses; returns (module, its former class) for each swap, for `unroute`. Nothing where oneDNN is missing."""
    if not available():
        return []
    swapped = []
    for m in module.modules():
        routed = _route(m)
        if routed is not None:
            swapped.append((m, type(m)))
            m.__class__ = routed
    return swapped


def unroute(swapped: list[tuple[nn.Module, type]]) -> None:
    for m, former in swapped:
        m.__class__ = former


def route_checked(module: nn.Module, run, rtol: float = 1e-4) -> bool:
    """Route `module` through oneDNN in place when `run(module)` (one forward pass on a fixed input) gives the same
    output routed as not, to `rtol` of its largest magnitude; else leave it as it was. True when routed."""
    if next(module.parameters(), torch.empty(0)).device.type != "cpu":
        return False
    with torch.inference_mode():
        reference = run(module)
        swapped = route_through_onednn(module)
        if not swapped:
            return False
        out = run(module)
    if torch.allclose(out, reference, rtol=rtol, atol=rtol * float(reference.abs().max())):
        return True
    unroute(swapped)
    return False


def default_paths(module: nn.Module) -> nn.Module:
    """A copy of `module` with every oneDNN subclass back to torch's own class (what the bench compares with)."""
    import copy

    twin = copy.deepcopy(module)
    for m in twin.modules():
        if type(m) in (OneDnnLinear, OneDnnConv1x1, OneDnnAttention):
            m.__class__ = type(m).__bases__[0]
    return twin
