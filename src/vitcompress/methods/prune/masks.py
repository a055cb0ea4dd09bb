"""Gated linear layers: one scalar per prunable unit, folded back into the weights afterwards.

Visual Transformer Pruning (Zhu et al., the study's ref [15], Fig. 2a) multiplies
every prunable dimension by a learnable gate and trains the gates with an L1
penalty. The same gates, frozen at 0 or 1, remove a candidate block exactly,
which is what the KL criterion (the study's eq. 8) needs. Gates sit on the
layer that the coupled group feeds:

* attention: the ``qkv`` projection gates the q and v outputs of each (head, dim).
  A zero on q removes that dimension's term from every logit, a zero on v removes
  it from the head's output, so ``g = 0`` equals cutting the dimension out of
  q, k, v and proj. k stays ungated: gating it too would put ``g**2`` on the logit.
* MLP: ``fc2`` gates its input, i.e. the hidden units after the activation
  (a gate before GELU would not scale the unit's output linearly).
* conv stem: the conv after a pruned conv gates its input channels, after the
  BatchNorm and ReLU (zero padding scales with the channel, so this too is linear).

Each is a subclass of the layer it replaces (``nn.Linear``, or ``nn.Conv2d`` in the stem)
that takes the original weight tensors, swapped in per instance; :func:`remove_gates`
swaps the plain layer back, folding the gate values into the weights (exact: the gates
are linear in the output / input).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .groups import CoupledGroup


class _GatedLinear(nn.Linear):
    """What the gated Linears share: a plain ``nn.Linear`` of the same shape, with or without the gate."""

    def _empty_linear(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)

    def plain(self) -> nn.Linear:
        """The same weights as a plain ``nn.Linear``, the gate dropped."""
        out = self._empty_linear()
        out.weight, out.bias = self.weight, self.bias
        return out


class QVGatedLinear(_GatedLinear):
    """timm's fused ``qkv`` Linear with a gate per (head, dim) on the q and v outputs."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, 3 * num_heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = head_dim
        # Flat (heads*head_dim,), so the training loop treats it like the MLP gates (1-D: no weight decay).
        self.gate = nn.Parameter(torch.ones(num_heads * head_dim, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_heads: int, head_dim: int) -> QVGatedLinear:
        new = cls(linear.in_features, num_heads, head_dim, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def _row_scale(self) -> torch.Tensor:
        # Output rows follow timm's reshape(B, N, 3, heads, head_dim): q block, k block, v block.
        return torch.cat([self.gate, torch.ones_like(self.gate), self.gate])  # (3*heads*head_dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self._row_scale()  # (B, N, 3*heads*head_dim)

    def folded(self) -> nn.Linear:
        """A plain Linear computing the same function, the gates multiplied into its rows."""
        scale = self._row_scale().detach()
        out = self._empty_linear()
        with torch.no_grad():
            out.weight.copy_(self.weight * scale[:, None])
            if self.bias is not None:
                out.bias.copy_(self.bias * scale)
        return out


class InputGatedLinear(_GatedLinear):
    """An ``nn.Linear`` (MLP ``fc2``) whose input features are each scaled by a gate."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gate = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> InputGatedLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.gate, self.weight, self.bias)  # (B, N, out)

    def folded(self) -> nn.Linear:
        out = self._empty_linear()
        with torch.no_grad():
            out.weight.copy_(self.weight * self.gate.detach()[None, :])
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class InputGatedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (the next conv of a stem) whose input channels are each scaled by a gate."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> InputGatedConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        new.gate = nn.Parameter(torch.ones(conv.in_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x * self.gate[:, None, None], self.weight, self.bias)  # x: (B, C, H, W)

    def _empty_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)

    def plain(self) -> nn.Conv2d:
        out = self._empty_conv()
        out.weight, out.bias = self.weight, self.bias
        return out

    def folded(self) -> nn.Conv2d:
        out = self._empty_conv()
        with torch.no_grad():
            out.weight.copy_(self.weight * self.gate.detach()[None, :, None, None])
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


GatedLinear = QVGatedLinear | InputGatedLinear | InputGatedConv2d
_GATED = (QVGatedLinear, InputGatedLinear, InputGatedConv2d)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_gates(model: nn.Module, groups: list[CoupledGroup]) -> list[GatedLinear]:
    """Swap the gate site of every group for its gated Linear (gates start at 1); one gate module per group."""
    gates: list[GatedLinear] = []
    for group in groups:
        linear = model.get_submodule(group.gate_site)
        if group.kind == "attn":
            heads, head_dim = group.shape
            gated: GatedLinear = QVGatedLinear.from_linear(linear, heads, head_dim)
        elif group.kind == "stem":
            gated = InputGatedConv2d.from_conv(linear)
        else:
            gated = InputGatedLinear.from_linear(linear)
        _set_module(model, group.gate_site, gated)
        gates.append(gated)
    return gates


def installed_gates(model: nn.Module, groups: list[CoupledGroup]) -> list[GatedLinear]:
    """The gate module of every group, in group order (after :func:`install_gates`)."""
    out = []
    for group in groups:
        mod = model.get_submodule(group.gate_site)
        if not isinstance(mod, _GATED):
            raise RuntimeError(f"{group.gate_site} carries no gate")  # a bug: gates were not installed
        out.append(mod)
    return out


def remove_gates(model: nn.Module, groups: list[CoupledGroup], *, fold: bool) -> nn.Module:
    """Swap plain Linears back; ``fold`` multiplies the gate values into the weights first."""
    for group, gated in zip(groups, installed_gates(model, groups), strict=True):
        _set_module(model, group.gate_site, gated.folded() if fold else gated.plain())
    return model


def gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for mod in model.modules():
        if isinstance(mod, _GATED):
            yield mod.gate
