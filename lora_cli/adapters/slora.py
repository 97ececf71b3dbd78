"""S-LoRA (scaled LoRA): h = W0 x + s_l * c * B A dropout(x), one learnable scale s_l per block
(../shared/specs/slora.md).

c is peft's own LoRA factor (alpha / r, or alpha / sqrt(r) with rsLoRA). The scales live in the model as
parameters θ in log space (s = exp(θ): positive, and an Adam step changes them multiplicatively), in a small
`SLoraScales` module attached to peft's LoraModel, so checkpoints save them by name like any adapter weight:

    base_model.slora.log_scale          per_layer: one θ per scale group (block, or module)
    base_model.slora.log_scale_global   global: (g0, g1), s_l = exp(g0 + g1 * l / (L - 1))

peft multiplies the adapter path by `layer.scaling[adapter]`, in the forward and in merges alike, so a forward
pre-hook sets it to the 0-dim tensor c * s_l (in the autograd graph) and a forward hook swaps in a detached
copy afterwards, so no graph outlives the forward. The saved adapter folds the scale into the up-projection,
B' = s_l * B, on copies: a standard LoRA adapter that stock peft loads and merges with no hook at all.

This module is imported only when `adapter=slora` is built, so torch and peft are imported at its top.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lora_cli.adapters.lora import Lora, block_index, lora_layers
from lora_cli.config import SLoraScaleConfig, TrainerConfig

ADAPTER = "default"  # peft's adapter name: lora-cli trains one adapter per model
SCALES_FILE = "slora_scales.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the wrapped model's module names


@dataclass(frozen=True)
class ScaleGroup:
    """Adapted modules sharing one scale: a block (`layers.3`), or a single module (its name)."""

    label: str
    block: int | None  # None: a module outside the transformer blocks


def block_position(block: int, n_blocks: int) -> float:
    """l / (L - 1): 0 at the first block, 1 at the last (0 for a one-block model)."""
    return block / (n_blocks - 1) if n_blocks > 1 else 0.0


def schedule_value(cfg: SLoraScaleConfig, block: int | None, n_blocks: int) -> float:
    """The initial s of a block: `init`, or with `linear` a ramp from `init_min` (block 0) to `init` (block L-1).
    Modules outside the blocks start at `init`."""
    if cfg.init_schedule == "constant" or block is None:
        return cfg.init
    return cfg.init_min + (cfg.init - cfg.init_min) * block_position(block, n_blocks)


def global_init(cfg: SLoraScaleConfig) -> tuple[float, float]:
    """(g0, g1) of `mode: global`. exp(g0 + g1 * l / (L - 1)) is geometric in l, so for the `linear` schedule
    it reproduces the endpoints exactly (init_min at block 0, init at block L-1) and lies below the arithmetic
    ramp in between; for `constant` it is exact everywhere."""
    if cfg.init_schedule == "constant":
        return math.log(cfg.init), 0.0
    return math.log(cfg.init_min), math.log(cfg.init) - math.log(cfg.init_min)


def scale_groups(names: list[str], granularity: str) -> tuple[list[ScaleGroup], dict[str, int]]:
    """The scale groups (blocks in order, then modules outside the blocks) and each adapted module's group."""
    if granularity == "module":
        groups = [ScaleGroup(name.removeprefix(PEFT_PREFIX), block_index(name)) for name in names]
        return groups, {name: i for i, name in enumerate(names)}
    blocks = sorted({b for b in map(block_index, names) if b is not None})
    outside = [name for name in names if block_index(name) is None]
    groups = [ScaleGroup(f"layers.{b}", b) for b in blocks]
    groups += [ScaleGroup(name.removeprefix(PEFT_PREFIX), None) for name in outside]
    label_of = {name: (f"layers.{block_index(name)}" if block_index(name) is not None
                       else name.removeprefix(PEFT_PREFIX)) for name in names}
    index = {group.label: i for i, group in enumerate(groups)}
    return groups, {name: index[label] for name, label in label_of.items()}


class SLoraScales(nn.Module):
    """The scale parameters and how each group's s is computed from them.

    per_layer: `log_scale[i]` = θ_i, s_i = exp(θ_i) for every group i.
    global: `log_scale_global` = (g0, g1) for the block groups, s_l = exp(g0 + g1 * l / (L - 1)); modules outside
    the blocks, if any are adapted, keep their own θ in `log_scale` (absent otherwise, so exactly 2 parameters).
    """

    def __init__(self, cfg: SLoraScaleConfig, groups: list[ScaleGroup], members: dict[str, int], n_blocks: int):
        super().__init__()
        self.mode = cfg.mode
        self.groups = groups
        self.members = members  # PeftModel module name -> group index, to fold the right scale into lora_B
        self.n_blocks = n_blocks
        in_blocks = [g for g in groups if g.block is not None]
        outside = [g for g in groups if g.block is None]
        if self.mode == "global":
            # Groups are ordered blocks first, so group i < n_global is a block and the rest index log_scale.
            self.n_global = len(in_blocks)
            self.positions = [block_position(g.block, n_blocks) for g in in_blocks]
            self.log_scale_global = self._param(global_init(cfg), cfg.learnable)
            logs = [math.log(schedule_value(cfg, None, n_blocks))] * len(outside)
        else:
            self.n_global = 0
            self.positions = []
            logs = [math.log(schedule_value(cfg, g.block, n_blocks)) for g in groups]
        if logs:
            self.log_scale = self._param(logs, cfg.learnable)
        # θ as initialised: bounds are relative to each group's own initial value.
        self.start = {name: p.detach().clone() for name, p in self.named_parameters()}
        self.initial = self.values().detach().tolist()

    @staticmethod
    def _param(values, learnable: bool) -> nn.Parameter:
        return nn.Parameter(torch.tensor(list(values), dtype=torch.float32), requires_grad=learnable)

    def value(self, group: int) -> torch.Tensor:
        """s of one group as a 0-dim tensor (differentiable in the scale parameters)."""
        if group < self.n_global:
            g = self.log_scale_global
            return torch.exp(g[0] + g[1] * self.positions[group])
        return torch.exp(self.log_scale[group - self.n_global])

    def values(self) -> torch.Tensor:
        """s of every group, in group order."""
        return torch.stack([self.value(i) for i in range(len(self.groups))])

    @torch.no_grad()
    def project(self, low: float, high: float) -> None:
        """Clamp every s / s_init into [low, high] by moving θ (a safety bound, applied after each step).

        In global mode log(s_l / s_l,init) = d0 + d1 * t with t = l / (L - 1) in [0, 1] is linear in t, so it stays
        in [log low, log high] at every block iff it does at both ends: clamp the two endpoint values and solve
        back for (g0, g1)."""
        lo, hi = math.log(low), math.log(high)
        for name, param in self.named_parameters():
            start = self.start[name].to(param.device, param.dtype)
            if name == "log_scale_global":
                d0, d1 = (param - start).unbind()
                first, last = d0.clamp(lo, hi), (d0 + d1).clamp(lo, hi)
                param.copy_(start + torch.stack([first, last - first]))
            else:
                param.copy_(start + (param - start).clamp(lo, hi))


def find_scales(model) -> SLoraScales:
    """The model's scale module, wherever a wrapper (PeftModel, DDP) put it."""
    for module in model.modules():
        if isinstance(module, SLoraScales):
            return module
    raise ValueError("this model has no S-LoRA scales; build it with SLora.apply")


def _set_scaling(scales: SLoraScales, group: int, c: float, layer, args) -> None:
    """Forward pre-hook: peft's LoRA forward reads `scaling[adapter]`, so c * s_l enters the graph there."""
    layer.scaling[ADAPTER] = c * scales.value(group)


def _release_scaling(layer, args, output) -> None:
    """Forward hook: keep the value (so a merge of the live model uses it) but drop its autograd graph."""
    layer.scaling[ADAPTER] = layer.scaling[ADAPTER].detach()


def attach_scales(peft_model, cfg: SLoraScaleConfig, n_blocks: int) -> SLoraScales:
    """Add the scale parameters to a freshly wrapped PeftModel and hook them into every LoRA layer."""
    layers = lora_layers(peft_model)
    groups, members = scale_groups(list(layers), cfg.granularity)
    device = next(iter(layers.values())).lora_A[ADAPTER].weight.device
    # Built on the CPU, where its initial values can be read, then moved beside the LoRA weights (which are on
    # the meta device for `lora train --dry-run`).
    scales = SLoraScales(cfg, groups, members, n_blocks).to(device)
    # On the LoraModel, not the transformers model: merge_and_unload returns the latter, free of it.
    peft_model.base_model.add_module("slora", scales)
    for name, layer in layers.items():
        c = float(layer.scaling[ADAPTER])  # as peft set it: alpha / r or alpha / sqrt(r)
        layer.register_forward_pre_hook(partial(_set_scaling, scales, members[name], c))
        layer.register_forward_hook(_release_scaling)
    return scales


def fold_scale(lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """B' = s * B, a new tensor (the training state is never touched): c * B' A = s * c * B A."""
    return (scale.detach().to(torch.float32) * lora_b.detach().to(torch.float32)).to(lora_b.dtype)


def folded_state_dict(model) -> dict:
    """The PeftModel's state dict with every lora_B (weight, and bias if any) replaced by its folded copy, and
    without the scales: peft saves every child of its LoraModel, and stock peft has no place to load them into.

    Built from named_parameters, not `model.state_dict()`: on a 4-bit base on CPU, bitsandbytes' state_dict
    changes the live model's outputs afterwards (~1e-3 on the tiny model; plain QLoRA too). peft keeps only
    the adapter's entries of it, whose keys are the parameter names."""
    scales = find_scales(model)
    values = scales.values().detach()
    skip = {id(p) for p in scales.parameters()}
    state = {key: p.detach() for key, p in model.named_parameters() if id(p) not in skip}
    for name, group in scales.members.items():
        for key in (f"{name}.lora_B.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.bias"):
            if key in state:
                state[key] = fold_scale(state[key], values[group])
    return state


def save_scales(scales: SLoraScales, path: Path, cfg: SLoraScaleConfig) -> None:
    """The raw scales (one 0-dim tensor per group, by label), with how they were parametrised as metadata."""
    from safetensors.torch import save_file

    values = scales.values().detach().float().cpu()
    tensors = {group.label: values[i].clone() for i, group in enumerate(scales.groups)}
    metadata = {"mode": cfg.mode, "granularity": cfg.granularity, "init": str(cfg.init),
                "init_schedule": cfg.init_schedule, "init_min": str(cfg.init_min),
                "learnable": str(cfg.learnable).lower(), "labels": json.dumps(list(tensors)),
                "initial": json.dumps(scales.initial),
                "folded": "lora_B in adapter_model.safetensors already holds s * B"}
    save_file(tensors, str(path), metadata=metadata)


def read_scales(folder: Path) -> dict[str, float]:
    """The scales a run saved, by group label, in group order (blocks first, as trained)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / SCALES_FILE), framework="pt") as f:
        labels = json.loads(f.metadata()["labels"])
        return {label: f.get_tensor(label).item() for label in labels}


def plot_scales(path: Path, labels: list[str], initial: list[float], final: list[float]) -> None:
    """scales.png: the value of each scale group, initial vs final."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(labels) + 2), 3.5))
    ax.plot(x, initial, "o--", color="grey", label="initial")
    ax.plot(x, final, "o-", color="C0", label="final")
    ax.set_xticks(x, [label.removeprefix("layers.") for label in labels],
                  rotation=90 if len(labels) > 16 else 0, fontsize=8)
    ax.set_xlabel("block" if all(label.startswith("layers.") for label in labels) else "scale group")
    ax.set_ylabel("s (adapter scale)")
    ax.set_title("S-LoRA scales")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SLora(Lora):
    """LoRA whose adapter path is multiplied by a learned scale per block (or per module)."""

    def apply(self, model):
        n_blocks = model.config.num_hidden_layers
        peft_model = super().apply(model)
        attach_scales(peft_model, self.cfg.scale, n_blocks)
        return peft_model

    def param_groups(self, model, trainer: TrainerConfig) -> list[dict]:
        """The scales get their own group: lr * lr_mult (Adam moves θ by about lr per step, so at the adapter's
        lr a scale could barely change), and no weight decay (it would pull θ to 0, i.e. s to 1)."""
        scale_params = [p for p in find_scales(model).parameters() if p.requires_grad]
        scale_ids = {id(p) for p in scale_params}
        adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in scale_ids]
        groups = [{"params": adapter_params}]
        if scale_params:
            groups.append({"params": scale_params, "lr": trainer.lr * self.cfg.scale.lr_mult, "weight_decay": 0.0})
        return groups

    def after_step(self, model) -> dict:
        """Project the scales into their bounds; log every group's s."""
        scales = find_scales(model)
        if self.cfg.scale.learnable:
            scales.project(*self.cfg.scale.bounds)
        return {"scales": scales.values().detach().float().cpu().tolist()}

    def state_tensors(self, model) -> dict:
        """Frozen scales (`learnable: false`) are no trainable parameter, so the checkpoint carries them here."""
        frozen = {id(p) for p in find_scales(model).parameters() if not p.requires_grad}
        return {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in frozen}

    def load_state_tensors(self, model, tensors: dict) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def save(self, model, out_dir: Path) -> None:
        """A stock peft LoRA adapter with the scales folded into lora_B, and the raw scales beside it."""
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=folded_state_dict(model))
        save_scales(find_scales(model), out_dir / SCALES_FILE, self.cfg.scale)

    def finish(self, model, run_dir: Path, history: list[dict]) -> None:
        scales = find_scales(model)
        logged = [record["scales"] for record in history if "scales" in record]
        final = logged[-1] if logged else scales.values().detach().float().cpu().tolist()
        plot_scales(Path(run_dir) / "scales.png", [g.label for g in scales.groups], scales.initial, final)

