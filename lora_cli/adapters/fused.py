"""LoRA's linear layer with its math in one autograd function: the same numbers as peft's, fewer passes over memory.

peft computes y = W x + s * B (A x) as separate modules: the frozen GEMM, two skinny GEMMs, then a scale and an
add over the whole (tokens x out) output; backward adds the scale's gradient pass and a second (tokens x in)
add for the two gradients that reach x. Here the scale and both adds ride inside the GEMMs (`addmm_`
accumulates into the result with alpha = s), and the backward is written out by hand:

    forward    down = x A^T            y = x W^T (+ b);  y += s * down B^T
    backward   g_down = s * g B        grad_B = s * g^T down     grad_A = g_down^T x
               grad_x = g W;  grad_x += g_down A

Measured on the speed benchmark's workload (SmolLM2-135M, r=16, all linear layers, CPU fp32), paired A/Bs
(benchmarks/fused_ab.py): 5-8% faster eager steps; 1-5% with compiled blocks, which fuse those passes too.
The parameters, their names and the saved adapter are peft's own: this class only replaces `forward`, and
only where its math is exactly
peft's (tests/test_fused_lora.py); everything else (merged or disabled adapters, several adapters, DoRA, a
scale inside the autograd graph as S-LoRA trains it, 4-bit or other non-`nn.Linear` bases, base layers with hooks
of their own, mixed dtypes) goes through peft's forward unchanged. `trainer.fused_lora=false` turns it off.

Under autocast (`trainer.precision=bf16`, or `auto` where it picks bf16) x, W, b and A are cast to autocast's
dtype, so the frozen GEMM and x A^T run in bf16, but s * down B^T is added to its result in fp32 (lora_B stays
fp32), and the output keeps the frozen weight's dtype: fp32 for an fp32 model, whose next layers read it in fp32;
bf16 for a bf16 model (`model.dtype=bfloat16`), as peft's is, whose next layers and output head are bf16. peft's
bf16 forward rounds W x + s B A x to bf16, whose 8 bits of mantissa swallow the LoRA delta while it is small
next to W x, as it is at the start of training. Measured on the workload above, 13 steps: with a bf16 output
(peft's rounding, and this layer's before) the loss ran 5-11% behind fp32's and the eval loss ended +7.3%; with
the delta in fp32, within 0.3% at every step and +0.2%. The backward takes g in fp32: g B and g^T down in fp32
(rank-sized), g W in bf16.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * (x' A^T) B^T for a frozen W (and b), where x' = dropout(x), or x itself (None); y in
    out_dtype, the delta added in lora_B's dtype before that."""

    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_A, lora_B, scaling: float, out_dtype: torch.dtype):
        rows = x.reshape(-1, x.shape[-1])
        rows_a = rows if x_dropped is None else x_dropped.reshape(rows.shape)
        down = rows_a @ lora_A.t()
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out = out.to(lora_B.dtype)  # lora_B's dtype is the output's: see "Under autocast" above
        out.addmm_(down.to(lora_B.dtype), lora_B.t(), alpha=scaling)
        ctx.save_for_backward(rows_a, weight, lora_A, lora_B, down)
        ctx.scaling, ctx.dropped = scaling, x_dropped is not None
        return out.to(out_dtype).view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows_a, weight, lora_A, lora_B, down = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(lora_B.dtype)  # a bf16 model's output gradient is bf16
        g_down = (g @ lora_B).mul_(ctx.scaling).to(lora_A.dtype)
        grad_A = g_down.t() @ rows_a if ctx.needs_input_grad[4] else None
        grad_B = (g.t() @ down.to(g.dtype)).mul_(ctx.scaling) if ctx.needs_input_grad[5] else None
        grad_x = grad_x_dropped = None
        shape = (*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[0]:
            grad_x = g.to(weight.dtype) @ weight
            if not ctx.dropped:  # both paths start at x: one accumulating GEMM instead of a second pass
                grad_x.addmm_(g_down, lora_A)
            grad_x = grad_x.view(shape)
        if ctx.needs_input_grad[1]:
            grad_x_dropped = (g_down @ lora_A).view(shape)
        return grad_x, grad_x_dropped, None, None, grad_A, grad_B, None, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear`, whose forward takes `LoraLinearFunction` where that is peft's math (exactly; under
    autocast, with LoRA's delta in fp32)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        x_dropped = None if isinstance(dropout, nn.Identity) else dropout(x)
        weight = self.base_layer.weight
        tensors = (x, x_dropped, weight, self.base_layer.bias, self.lora_A[name].weight, self.lora_B[name].weight)
        if torch.is_autocast_enabled(x.device.type):  # the GEMMs in autocast's dtype, lora_B (the delta) as it is
            dtype = torch.get_autocast_dtype(x.device.type)
            tensors = tuple(None if t is None else t.to(dtype) for t in tensors[:5]) + tensors[5:]
        return LoraLinearFunction.apply(*tensors, self.scaling[name], weight.dtype)

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The single active adapter, if the fused path computes what peft would (exactly; to autocast's rounding
        under autocast); else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if name not in self.lora_A or name in self.lora_variant or not isinstance(self.scaling[name], (int, float)):
            return None  # DoRA and other variants; a tensor scale (S-LoRA) has a gradient of its own
        if type(base) is not nn.Linear or base.weight.requires_grad or (base.bias is not None and
                                                                        base.bias.requires_grad):
            return None
        if base._forward_pre_hooks or base._forward_hooks:  # e.g. ScaLoRA's fp32 hold on a bf16 model: peft's
            return None  # forward calls the base layer, and so its hooks; this one reads the weight alone
        if torch.is_autocast_enabled(x.device.type):  # forward casts what autocast would, whatever x's float dtype
            return name if x.is_floating_point() else None
        return name if x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype else None
