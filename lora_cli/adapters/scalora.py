"""ScaLoRA (Zhang et al., ICML 2026, arXiv 2510.23818): every `interval` optimizer steps, merge part of the
adapter into the frozen weight and continue from optimally column-rescaled factors, carrying AdamW's moments
over, so the accumulated update W_T - W_0 becomes high-rank. The spec is ../shared/specs/scalora.md ("spec"
below, cited by line); this module follows its notation:

    PEFT:  W x + s B A x         B = lora_B.weight (m x r), A = lora_A.weight (r x n), s = layer.scaling
    paper: (W_pt + A_p B_p^T) x  A_p = sqrt(s) B,  B_p = sqrt(s) A^T,  a step of lr eta is one of s * eta

The math is a handful of pure functions over tensors (`paper_factors`, `scale_system`, `column_solution`,
`scalar_solution`, `optimal_scales`, `rescale_layer`, `svd_export`); the `ScaLora` class only wires them into
the loop's hooks:

    apply -> param_groups -> [backward -> before_clip (rescale) -> clip -> optimizer.step -> after_step]* -> save

The base weights of adapted modules change during training, so they are part of every artifact: `save`
writes `base_weights.safetensors` (the mutated weights, keyed by the base checkpoint's state-dict key) beside
the stock peft adapter, and `runs.apply_base_weights` puts them into a freshly loaded pristine base before the
adapter is loaded on top. `export_lowrank_adapter` writes the lossy stock-peft alternative (truncated SVD).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path

from lora_cli.adapters.lora import Lora, lora_layers
from lora_cli.artifacts import BASE_WEIGHTS
from lora_cli.config import AdapterConfig, ScaLoraConfig, TrainerConfig
from lora_cli.errors import UserError

BRANCHES = ("column", "scalar", "skip")
PROBE_EVERY = 10  # log the probe module's numerical rank on every 10th rescale (an SVD of one matrix)
RANK_RTOL = 1e-3  # numerical rank: singular values above this fraction of the largest one


# ---------------------------------------------------------------------------------------------------------
# The scaling: pure functions over tensors (spec lines 17-35)
# ---------------------------------------------------------------------------------------------------------

def paper_factors(A, B, grad_A, grad_B, s: float):
    """PEFT's (A, B, grad A, grad B) as the paper's (A_p, B_p, gA_p, gB_p), in fp64 (spec lines 19-21):
    A_p = sqrt(s) B (m x r), B_p = sqrt(s) A^T (n x r), gA_p = grad(B) / sqrt(s), gB_p = grad(A)^T / sqrt(s).
    fp64 because the 2r x 2r systems below multiply weights (~1e-2) with gradients (~1e-5) twice."""
    root = s ** 0.5
    A, B, grad_A, grad_B = (t.detach().double() for t in (A, B, grad_A, grad_B))
    return root * B, root * A.T, grad_B / root, grad_A.T / root


def scale_system(A_p, B_p, gA_p, gB_p):
    """The quadratic model of the next step as a 2r x 2r system (H, lam), spec lines 26-29.

    Rescaling A_p -> A_p diag(alpha), B_p -> B_p diag(beta) and taking one gradient step of lr eta_p moves the
    weight, to first order, by dW = -eta_p sum_k c_k X_k with c = [alpha^2; beta^2] and the 2r rank-one
    "design matrices" X_i = A_p[:, i] gB_p[:, i]^T, X_{r+j} = gA_p[:, j] B_p[:, j]^T. With the smoothness bound
    f(W + dW) <= f(W) + <G, dW> + L/2 ||dW||^2 this is -eta_p lam^T c + L eta_p^2 / 2 c^T H c, where
    lam_k = <G, X_k> (= the squared column norms below, since gA_p = G B_p and gB_p = G^T A_p) and
    H_kl = <X_k, X_l> = (SA^T SA)_kl (SB^T SB)_kl. Only A, B and their gradients are needed, never G."""
    import torch

    SA = torch.cat([A_p, gA_p], dim=1)
    SB = torch.cat([gB_p, B_p], dim=1)
    H = (SA.T @ SA) * (SB.T @ SB)
    lam = torch.cat([gB_p.square().sum(0), gA_p.square().sum(0)])
    return H, lam


def ridged(H, ridge: float):
    """H + ridge * mean(diag H) * I (spec line 30): relative, so invariant to a global gradient factor."""
    import torch

    return H + ridge * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def column_solution(H, lam, ridge: float):
    """v = H_ridged^-1 lam (spec line 31), the unconstrained minimiser of the bound times L eta_p; None when
    the system cannot be solved (singular or non-finite)."""
    import torch

    v, info = torch.linalg.solve_ex(ridged(H, ridge), lam)
    return v if int(info) == 0 and bool(torch.isfinite(v).all()) else None


def scalar_solution(H, lam, ridge: float):
    """[a, b] * L eta_p of the scalar variant alpha = sqrt(a) 1, beta = sqrt(b) 1 (spec lines 33-34): the same
    bound with one coefficient per half, so the design matrices are the sums of each half's X_k and the 2x2
    system sums H's r x r blocks (of the ridged H, as the spec orders it) and lam's halves."""
    import torch

    Hr = ridged(H, ridge)
    r = H.shape[0] // 2
    Hs = torch.stack([torch.stack([Hr[:r, :r].sum(), Hr[:r, r:].sum()]),
                      torch.stack([Hr[r:, :r].sum(), Hr[r:, r:].sum()])])
    cs = torch.stack([lam[:r].sum(), lam[r:].sum()])
    ab, info = torch.linalg.solve_ex(Hs, cs)
    return ab if int(info) == 0 and bool(torch.isfinite(ab).all()) else None


def optimal_scales(A_p, B_p, gA_p, gB_p, L: float, eta_p: float, ridge: float, column_wise: bool = True):
    """(alpha, beta, branch) minimising the quadratic bound (spec lines 26-34), before any clamp.

    branch is "column" (alpha, beta per column, all of v positive), "scalar" (the 2-scalar fallback, both
    positive; alpha, beta constant vectors) or "skip" (neither has a positive solution, or non-finite input):
    alpha, beta are then None. Inputs are the paper's factors (`paper_factors`); results are fp64 vectors of
    length r. A global factor on both gradients cancels between H and lam (spec line 50)."""
    import torch

    r = A_p.shape[1]
    if not all(bool(torch.isfinite(t).all()) for t in (A_p, B_p, gA_p, gB_p)):
        return None, None, "skip"
    H, lam = scale_system(A_p, B_p, gA_p, gB_p)
    step = L * eta_p
    v = column_solution(H, lam, ridge) if column_wise else None
    if v is not None and bool((v > 0).all()):
        return (v[:r] / step).sqrt(), (v[r:] / step).sqrt(), "column"
    ab = scalar_solution(H, lam, ridge)
    if ab is not None and bool((ab > 0).all()):
        ones = torch.ones(r, dtype=ab.dtype, device=ab.device)
        return (ab[0] / step).sqrt() * ones, (ab[1] / step).sqrt() * ones, "scalar"
    return None, None, "skip"


# ---------------------------------------------------------------------------------------------------------
# One adapted module: its tensors, its learning rate, the in-place rescale (spec lines 37-45)
# ---------------------------------------------------------------------------------------------------------

def adapter_name(layer) -> str:
    """The one adapter of a LoRA layer (several at once are refused: one rescale per factor pair)."""
    names = list(layer.lora_A.keys())
    if len(names) != 1:
        raise UserError(f"adapter=scalora needs exactly one adapter per module; found {names}")
    return names[0]


def factors(layer):
    """(A, B, s) of a LoRA layer: lora_A.weight (r x n), lora_B.weight (m x r) and the scaling s."""
    name = adapter_name(layer)
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def dense_weight(layer):
    """The base weight W as an (out x in) view, whatever the storage (GPT-2's Conv1D stores W^T)."""
    weight = layer.get_base_layer().weight
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def effective_lr(lr: float, A, B, optimizer, eta_mode: str) -> float:
    """The eta of the formula (spec lines 64-65), before the factor s of the paper's parametrisation.

    raw: the peak lr. adam_effective: lr / (median(sqrt(v_hat)) + eps), Adam's step size per unit of
    gradient for a typical entry. The median runs over every entry of this module's lora_A.weight and
    lora_B.weight together (lower median for an even count); v_hat = exp_avg_sq / (1 - beta2^step) is the
    bias-corrected second moment held by the optimizer before this step's update. A parameter without optimizer
    state yet (before its first optimizer.step) contributes grad^2 instead: that is exactly Adam's v_hat on its
    first step. eps (Adam's, of the parameter's group) keeps an all-zero v_hat finite, as in Adam itself."""
    import torch

    if eta_mode == "raw":
        return lr
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    roots, eps = [], 0.0
    for p in (A, B):
        group, state = groups[id(p)], optimizer.state.get(p, {})
        eps = group["eps"]
        if "exp_avg_sq" in state and float(state["step"]) > 0:
            v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        else:
            v_hat = p.grad.square()
        roots.append(v_hat.detach().double().sqrt().flatten())
    return lr / (float(torch.cat(roots).median()) + eps)


def layer_scales(layer, optimizer, cfg: ScaLoraConfig, lr: float):
    """(alpha, beta, branch) for one adapted module from its factors and this step's gradients, clamped to
    cfg.clip (spec line 35). Skips (branch "skip") a module without gradients or with non-finite values."""
    import math

    A, B, s = factors(layer)
    if A.grad is None or B.grad is None:
        return None, None, "skip"
    eta = effective_lr(lr, A, B, optimizer, cfg.eta_mode)
    if not math.isfinite(eta) or eta <= 0:
        return None, None, "skip"
    alpha, beta, branch = optimal_scales(*paper_factors(A, B, A.grad, B.grad, s), L=cfg.L, eta_p=s * eta,
                                         ridge=cfg.ridge, column_wise=cfg.column_wise)
    if branch == "skip":
        return None, None, branch
    low, high = cfg.clip
    return alpha.clamp(low, high), beta.clamp(low, high), branch


def rescale_layer(layer, optimizer, alpha, beta, moments: str = "chain_rule") -> None:
    """The in-place rescale of one module (spec lines 39-45); the model's function is unchanged.

        W += s (B diag(1 - alpha*beta)) A      merge the part the rescale removes from s B A
        B[:, k] *= alpha_k ; A[k, :] *= beta_k
        grad(B)[:, k] *= beta_k ; grad(A)[k, :] *= alpha_k     chain rule through s B A
        chain_rule: exp_avg(B) columns *= beta, exp_avg_sq(B) *= beta^2, A's rows with alpha (spec lines 52-55:
                    m / sqrt(v), hence the next Adam direction, is unchanged)
        own:        each factor's moments scaled by its own multiplier (the other reading, for ablations)

    `optimizer` may be None (no moments to carry). alpha = beta = 1 changes nothing, bit for bit."""
    import torch

    A, B, s = factors(layer)
    a, b = alpha.to(B.device, B.dtype), beta.to(A.device, A.dtype)
    keep = (1 - a.double() * b.double()).to(B.dtype)
    with torch.no_grad():
        dense_weight(layer).addmm_(B * keep, A, alpha=s)
        B.mul_(a)
        A.mul_(b[:, None])
        if B.grad is not None:
            B.grad.mul_(b)
        if A.grad is not None:
            A.grad.mul_(a[:, None])
        if optimizer is not None:
            mult_B, mult_A = (b, a) if moments == "chain_rule" else (a, b)
            scale_moments(optimizer.state.get(B, {}), mult_B)
            scale_moments(optimizer.state.get(A, {}), mult_A[:, None])


def scale_moments(state: dict, mult) -> None:
    """Adam(W) moments of one factor: exp_avg *= mult, exp_avg_sq (and AMSGrad's max) *= mult^2; step kept."""
    if "exp_avg" in state:
        state["exp_avg"].mul_(mult)
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].mul_(mult.square())


def numerical_rank(matrix, rtol: float = RANK_RTOL) -> int:
    """Singular values above rtol * the largest one (fp64). The default 1e-3 sits far above the rounding of
    thousands of fp32 merges (~1e-6 relative) and below any update the model would notice."""
    import torch

    sigma = torch.linalg.svdvals(matrix.detach().double())
    if sigma.numel() == 0 or float(sigma[0]) == 0:
        return 0
    return int((sigma > rtol * sigma[0]).sum())


# ---------------------------------------------------------------------------------------------------------
# Adapted modules and their base weights
# ---------------------------------------------------------------------------------------------------------

def adapted_layers(model) -> dict[str, object]:
    """Every LoRA layer by the base checkpoint's state-dict key of its weight, e.g.
    "model.layers.0.self_attn.q_proj.weight" (names taken inside the peft wrapper, as in the base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {f"{name}.weight": layer for name, layer in sorted(lora_layers(base).items())}


def base_weights(model) -> dict:
    """The current (mutated) base weight of every adapted module, keyed like `adapted_layers`, in storage
    layout: detached views of the live parameters, so copy them if you keep them past the next step."""
    return {key: layer.get_base_layer().weight.detach() for key, layer in adapted_layers(model).items()}


def weights_sha256(tensors: Mapping) -> str:
    """sha256 over (key, shape, fp32 bytes) in key order: the same values give the same hash whatever the
    dtype they were loaded in, as long as it holds them exactly."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _inputs_to_fp32(module, args):
    return (args[0].float(), *args[1:])


def _output_to(dtype, module, args, output):
    return output.to(dtype)


def hold_in_fp32(linear) -> bool:
    """Keep an adapted base linear in fp32 (spec: thousands of small merges drift in bf16/fp16); when the model
    runs in another dtype, the layer computes in fp32 and hands its output back in that dtype (under autocast
    the matmul still runs in the autocast dtype). Returns whether the layer was converted."""
    import torch

    dtype = linear.weight.dtype
    if dtype == torch.float32:
        return False
    linear.weight.data = linear.weight.data.float()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.float()
    linear.register_forward_pre_hook(_inputs_to_fp32)
    linear.register_forward_hook(functools.partial(_output_to, dtype))
    return True


# ---------------------------------------------------------------------------------------------------------
# Export: a stock peft LoRA of rank R from each module's total update (spec "Artifacts", item 3)
# ---------------------------------------------------------------------------------------------------------

def svd_export(delta, rank: int, dtype=None):
    """(B, A, rel_error): the best rank-`rank` factorisation of `delta` (m x n) in Frobenius norm, in peft's
    shapes for alpha = rank (scaling 1): B = U_R S_R (m x R), A = V_R^T (R x n), by truncated SVD in fp64, then
    rounded to `dtype` (default: delta's), the precision the factors are saved in. When rank exceeds min(m, n)
    the extra columns / rows are zero (the export is then exact up to that rounding). rel_error is
    ||delta - B A||_F / ||delta||_F measured with the returned, rounded factors (0 for a zero delta), so it is
    the error of what a user loads."""
    import torch

    d = delta.detach().double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, S.numel())
    B = torch.zeros(d.shape[0], rank, dtype=d.dtype, device=d.device)
    A = torch.zeros(rank, d.shape[1], dtype=d.dtype, device=d.device)
    B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
    B, A = B.to(dtype or delta.dtype), A.to(dtype or delta.dtype)
    norm = float(torch.linalg.matrix_norm(d))
    error = float(torch.linalg.matrix_norm(d - B.double() @ A.double())) / norm if norm > 0 else 0.0
    return B, A, error


def total_update(layer, pristine_weight):
    """W_T - W_0 of one module in fp64, (out x in): the mutated base plus s B A minus the pristine weight
    (given in the base's storage layout)."""
    A, B, s = factors(layer)
    W0 = pristine_weight.T if getattr(layer, "fan_in_fan_out", False) else pristine_weight
    W = dense_weight(layer).detach().double()
    return W + s * (B.detach().double() @ A.detach().double()) - W0.to(W.device, W.dtype)


def export_lowrank_adapter(model, pristine: Mapping, rank: int, out_dir: Path) -> dict[str, float]:
    """Write a stock peft LoRA of rank `rank` (adapter_config.json with r = lora_alpha = rank, the run's target
    modules, adapter_model.safetensors in fp32) approximating each module's total update W_T - W_0; returns the
    relative Frobenius error per module, keyed like `adapted_layers`.

    model: the trained PeftModel (mutated base weights in place, e.g. via `runs.apply_base_weights`, adapter loaded).
    pristine: the original base weights by state-dict key (e.g. `pristine_model.state_dict()`, or only the
    adapted keys): loaded on the pristine base, the export replaces base + base_weights + adapter."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, errors = {}, {}
    for key, layer in adapted_layers(model).items():
        if key not in pristine:
            raise UserError(f"the pristine base has no {key}; pass the base the run was trained on")
        B, A, errors[key] = svd_export(total_update(layer, pristine[key]), rank, dtype=torch.float32)
        module = "base_model.model." + key.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"{module}.lora_B.weight"] = B.cpu().contiguous()
    config = copy.deepcopy(model.peft_config[adapter_name(next(iter(adapted_layers(model).values())))])
    config.r, config.lora_alpha, config.use_rslora = rank, rank, False
    config.rank_pattern, config.alpha_pattern, config.inference_mode = {}, {}, True
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return errors


# ---------------------------------------------------------------------------------------------------------
# The variant: hooks of the training loop
# ---------------------------------------------------------------------------------------------------------

class ScaLora(Lora):
    """LoRA with ScaLoRA's periodic merge-and-rescale in `before_clip`; checkpoints and saved runs carry the
    mutated base weights of adapted modules."""

    def __init__(self, cfg: AdapterConfig, trainer: TrainerConfig | None = None, steps: int = 0):
        if cfg.scalora is None:
            raise UserError("adapter.scalora is not set; use adapter=scalora")
        super().__init__(cfg, trainer, steps)
        self.sc: ScaLoraConfig = cfg.scalora
        self.pristine_sha256: str | None = None
        self.probe: tuple[str, object] | None = None  # (key, W_0) of one module, for the rank log

    @property
    def warmup(self) -> int:
        """First step that may rescale: scalora.warmup, or min(100, 10% of the run's steps) (spec line 62)."""
        return self.sc.warmup if self.sc.warmup is not None else min(100, int(0.1 * self.steps))

    def apply(self, model):
        """peft LoRA, then: refuse what the merge cannot handle (spec lines 78-84), keep adapted base weights in
        fp32, record a hash of the pristine ones and a copy of one probe module's W_0."""
        if hasattr(model, "peft_config"):
            raise UserError("adapter=scalora needs a plain base model: this one already carries an adapter "
                            "(several adapters at once are not supported)")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise UserError("adapter=scalora cannot merge into a quantized base (exact merges into 4/8-bit "
                            "weights are impossible); set adapter.quantize=null")
        if self.cfg.use_dora:
            raise UserError("adapter=scalora cannot be combined with adapter.use_dora=true: its rescale assumes "
                            "W + s * B A; set adapter.use_dora=false")
        model = super().apply(model)
        layers = adapted_layers(model)
        for key, layer in layers.items():
            name = adapter_name(layer)
            if layer.use_dora.get(name, False) or not hasattr(layer.get_base_layer(), "weight"):
                raise UserError(f"adapter=scalora cannot rescale {key}: DoRA or a non-linear base layer")
            hold_in_fp32(layer.get_base_layer())
        weights = base_weights(model)
        probe = next(iter(layers))
        if weights[probe].is_meta:  # `lora train --dry-run` plans on the architecture alone: nothing to hash
            return model
        self.pristine_sha256 = weights_sha256(weights)
        self.probe = (probe, weights[probe].clone())
        return model

    def before_clip(self, model, optimizer, step: int) -> dict:
        """The rescale of every adapted module when step >= warmup and step % interval == 0 (spec lines 73-76).
        Logs the quantiles of alpha*beta over all rescaled columns, the number of modules per branch and, on
        every PROBE_EVERY-th rescale, the numerical rank of the probe module's cumulative update."""
        optimizer = check_optimizer(optimizer)
        if step < self.warmup or step % self.sc.interval != 0:
            return {}
        if self.trainer is None:
            raise ValueError("ScaLora needs the trainer config (its peak lr enters the formula)")
        counts, products = dict.fromkeys(BRANCHES, 0), []
        for key, layer in adapted_layers(model).items():
            if layer.merged:
                raise UserError(f"{key} has peft's merge_adapter() applied; adapter=scalora merges by itself")
            alpha, beta, branch = layer_scales(layer, optimizer, self.sc, self.trainer.lr)
            counts[branch] += 1
            if branch != "skip":
                rescale_layer(layer, optimizer, alpha, beta, self.sc.moments)
                products.append(alpha * beta)
        logs = {f"scalora_{branch}": count for branch, count in counts.items()}
        logs.update(product_quantiles(products))
        if self.probe is not None and (step // self.sc.interval) % PROBE_EVERY == 0:
            key, W0 = self.probe
            layer = adapted_layers(model)[key]
            logs["scalora_probe_rank"] = numerical_rank(total_update(layer, W0))
        return logs

    def state_tensors(self, model) -> dict:
        """The mutated base weights of every adapted module by base state-dict key (exact, fp32)."""
        return base_weights(model)

    def load_state_tensors(self, model, tensors: dict) -> None:
        """Copy saved base weights into a freshly built model (after `apply`), in place and exactly."""
        import torch

        with torch.no_grad():
            for key, weight in base_weights(model).items():
                if key not in tensors:
                    raise UserError(f"the checkpoint lacks the ScaLoRA base weight {key}; it was saved by "
                                    "another run or adapter config")
                weight.copy_(tensors[key])

    def save(self, model, out_dir: Path) -> None:
        """The stock peft adapter plus `base_weights.safetensors` (the mutated base weights, fp32, with the base
        id and the sha256 of the pristine weights): `runs.apply_base_weights` then the adapter reproduce the model."""
        from safetensors.torch import save_file

        super().save(model, out_dir)
        tensors = {key: w.cpu().contiguous() for key, w in base_weights(model).items()}
        config = next(iter(model.peft_config.values()))
        metadata = {"format": "pt", "content": "ScaLoRA mutated base weights of the adapted modules",
                    "base_model": str(config.base_model_name_or_path),
                    "pristine_sha256": self.pristine_sha256 or "unknown"}
        save_file(tensors, str(Path(out_dir) / BASE_WEIGHTS), metadata=metadata)


def check_optimizer(optimizer):
    """The torch Adam/AdamW whose moments the rescale carries over (spec line 79); unwraps accelerate's
    AcceleratedOptimizer. Any other optimizer is refused: its state would not match the new factors."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        raise UserError(f"adapter=scalora transfers Adam/AdamW moments across its rescale; the optimizer is "
                        f"{type(inner).__name__}: train it with torch.optim.AdamW")
    return inner


def product_quantiles(products: list) -> dict:
    """min / 10% / median / 90% / max of alpha*beta over every rescaled column (healthy runs keep the median
    near 1, spec line 69); empty when nothing was rescaled."""
    import torch

    if not products:
        return {}
    values = torch.cat([p.double().cpu() for p in products])
    qs = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=values.dtype))
    return {f"scalora_ab_{name}": float(q) for name, q in zip(("min", "p10", "median", "p90", "max"), qs,
                                                                 strict=True)}
