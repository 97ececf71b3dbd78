"""ScaLoRA (lora_cli/adapters/scalora.py) against the checks of ../shared/specs/scalora.md ("Checks an
implementation must pass", 1-9), in-process on tiny_llama (fp32 unless a test says otherwise).

Notation as in the spec: PEFT's B (m x r), A (r x n), s; the paper's A_p = sqrt(s) B, B_p = sqrt(s) A^T, and
the dense gradient G of the loss in W, so that gA_p = G B_p and gB_p = G^T A_p."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import compose_run
from safetensors.torch import load_file

from lora_cli.adapters.lora import Lora
from lora_cli.adapters.scalora import (
    ScaLora,
    adapted_layers,
    column_solution,
    effective_lr,
    export_lowrank_adapter,
    factors,
    numerical_rank,
    optimal_scales,
    rescale_layer,
    scalar_solution,
    scale_system,
    total_update,
)
from lora_cli.artifacts import BASE_WEIGHTS
from lora_cli.errors import UserError
from lora_cli.models import load_model
from lora_cli.runs import apply_base_weights

# rescale every step from step 2 (B = 0 before the first optimizer step makes every module skip)
EVERY_STEP = ["adapter.scalora.interval=1", "adapter.scalora.warmup=2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 shared cores: with several intra-op threads a tiny model's step is 30x slower (threads spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(*overrides: str):
    return compose_run(["model=tiny_llama", "adapter=scalora", "adapter.r=4", "trainer.lr=1e-2",
                        "trainer.weight_decay=0", *overrides])


@pytest.fixture(scope="module")
def pristine(tiny_checkpoint):
    """The pristine tiny base, loaded once; tests work on deep copies."""
    return load_model(tiny_checkpoint, run_config().model)


@pytest.fixture(scope="module")
def batch(pristine):
    return torch.randint(0, pristine.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def build(variant, pristine, seed: int = 0):
    torch.manual_seed(seed)  # peft's init of lora_A
    return variant.apply(copy.deepcopy(pristine))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def randomize_B(model, std: float = 0.1, seed: int = 1) -> None:
    """Nonzero B (peft starts it at 0, where the adapter is invisible and every rescale a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            B = factors(layer)[1]
            B.copy_(torch.randn(B.shape, generator=g) * std)


def backward(model, batch) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.detach()


def random_scales(r: int, g: torch.Generator):
    return 0.5 + 1.5 * torch.rand(r, generator=g, dtype=torch.float64), \
        0.5 + 1.5 * torch.rand(r, generator=g, dtype=torch.float64)


def train(variant, model, trainer, batch, steps: int, optimizer=None, first_step: int = 1):
    """The loop's order (train.py): backward -> before_clip -> clip -> optimizer.step -> after_step, step
    counting from 1; constant lr (a scheduler plays no part in these checks). Returns (optimizer, losses, logs)."""
    if optimizer is None:
        optimizer = torch.optim.AdamW(variant.param_groups(model, trainer), lr=trainer.lr,
                                      weight_decay=trainer.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, logs = [], []
    for step in range(first_step, first_step + steps):
        losses.append(backward(model, batch))
        logs.append(variant.before_clip(model, optimizer, step))
        torch.nn.utils.clip_grad_norm_(params, trainer.max_grad_norm)
        optimizer.step()
        logs[-1].update(variant.after_step(model))
    return optimizer, losses, logs


def rescaled_modules(logs: list[dict]) -> int:
    return sum(log.get("scalora_column", 0) + log.get("scalora_scalar", 0) for log in logs)


# ----------------------------------------------------------------------------------------------------------
# The closed form, as pure functions (checks 1, 2, 8)
# ----------------------------------------------------------------------------------------------------------

def factor_problem(seed: int = 0, m: int = 7, n: int = 5, r: int = 3):
    """Random paper factors and a dense gradient G, with the factor gradients G implies (fp64)."""
    g = torch.Generator().manual_seed(seed)
    A_p, B_p, G = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((m, r), (n, r), (m, n)))
    return A_p, B_p, G @ B_p, G.T @ A_p, G


def least_squares(designs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """argmin_c || sum_k c_k designs[k] - target ||_F, by lstsq on the flattened matrices."""
    D = torch.stack([X.flatten() for X in designs], dim=1)
    return torch.linalg.lstsq(D, target.flatten().unsqueeze(1), driver="gelsd").solution.squeeze(1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_closed_form_equals_brute_force_least_squares():
    """Check 1. Rescaling A_p -> A_p diag(alpha), B_p -> B_p diag(beta) and taking one gradient step of lr eta
    moves W by dW = -eta sum_k c_k X_k, c = [alpha^2; beta^2], over the 2r design matrices
    X_i = A_p[:, i] gB_p[:, i]^T and X_{r+j} = gA_p[:, j] B_p[:, j]^T. The spec's quadratic bound
    f(W + dW) <= f(W) + <G, dW> + L/2 ||dW||^2 is then, completing the square,
    L eta^2 / 2 || sum_k c_k X_k - G / (L eta) ||^2 + const: its minimiser is the least-squares fit of
    G / (L eta) by the X_k, computed here by brute force on the dense (m n x 2r) design matrix and compared
    with the spec's 2r x 2r closed form (ridge 0: the ridge is a deliberate perturbation)."""
    A_p, B_p, gA_p, gB_p, G = factor_problem(seed=0)
    r, L, eta = A_p.shape[1], 3.0, 0.02
    designs = [torch.outer(A_p[:, i], gB_p[:, i]) for i in range(r)] + \
              [torch.outer(gA_p[:, j], B_p[:, j]) for j in range(r)]
    brute = least_squares(designs, G / (L * eta))
    v = column_solution(*scale_system(A_p, B_p, gA_p, gB_p), ridge=0.0)
    assert relative(v / (L * eta), brute) < 1e-8
    alpha, beta, branch = optimal_scales(A_p, B_p, gA_p, gB_p, L, eta, ridge=0.0)
    assert branch == "column"  # this seed's minimiser is positive, so c = [alpha^2; beta^2] exactly
    assert relative(torch.cat([alpha, beta]).square(), brute) < 1e-8


def test_scales_invariant_to_a_global_gradient_factor():
    """Check 2: gradients x 7.3 (an AMP loss scale, clipping, sum vs mean) leave alpha, beta unchanged."""
    A_p, B_p, gA_p, gB_p, _ = factor_problem(seed=0)
    alpha, beta, branch = optimal_scales(A_p, B_p, gA_p, gB_p, 3.0, 0.02, ridge=1e-10)
    alpha2, beta2, branch2 = optimal_scales(A_p, B_p, 7.3 * gA_p, 7.3 * gB_p, 3.0, 0.02, ridge=1e-10)
    assert branch == branch2 == "column"
    assert relative(alpha2, alpha) < 1e-10 and relative(beta2, beta) < 1e-10
    alpha, beta, _ = optimal_scales(A_p, B_p, gA_p, gB_p, 3.0, 0.02, ridge=1e-10, column_wise=False)
    alpha2, beta2, _ = optimal_scales(A_p, B_p, 7.3 * gA_p, 7.3 * gB_p, 3.0, 0.02, ridge=1e-10, column_wise=False)
    assert relative(alpha2, alpha) < 1e-10 and relative(beta2, beta) < 1e-10


def test_scalar_fallback_equals_brute_force_least_squares():
    """Check 8: alpha = sqrt(a) 1, beta = sqrt(b) 1 turns the design matrices into the two sums
    A_p gB_p^T = sum_i X_i and gA_p B_p^T = sum_j X_{r+j}; the same bound's minimiser is the least-squares fit of
    G / (L eta) by these two, compared with the spec's 2x2 block-sum system."""
    A_p, B_p, gA_p, gB_p, G = factor_problem(seed=1)
    L, eta = 3.0, 0.02
    brute = least_squares([A_p @ gB_p.T, gA_p @ B_p.T], G / (L * eta))
    ab = scalar_solution(*scale_system(A_p, B_p, gA_p, gB_p), ridge=0.0)
    assert relative(ab / (L * eta), brute) < 1e-8
    alpha, beta, branch = optimal_scales(A_p, B_p, gA_p, gB_p, L, eta, ridge=0.0, column_wise=False)
    assert branch == "scalar"
    assert relative(alpha.square(), brute[0].expand(3)) < 1e-8 and relative(beta.square(), brute[1].expand(3)) < 1e-8
    # seed 1 is one where the column-wise minimiser has a negative entry: the fallback is taken on its own
    assert optimal_scales(A_p, B_p, gA_p, gB_p, L, eta, ridge=0.0)[2] == "scalar"


def test_zero_B_skips():
    """B = 0 (peft's init): A_p = 0 makes H singular and a = 0, so the module is skipped, not rescaled by inf."""
    A_p, B_p, gA_p, _, _ = factor_problem(seed=0)
    zero = torch.zeros_like(A_p)
    assert optimal_scales(zero, B_p, gA_p, torch.zeros_like(B_p), 1.0, 0.01, ridge=1e-10) == (None, None, "skip")


# ----------------------------------------------------------------------------------------------------------
# The rescale on the model (checks 3-6)
# ----------------------------------------------------------------------------------------------------------

def test_rescale_preserves_the_function(pristine, batch):
    """Check 3: logits before and after a rescale of every module (random alpha, beta in [0.5, 2])."""
    cfg = run_config()
    model = build(ScaLora(cfg.adapter, cfg.trainer), pristine)
    randomize_B(model)
    before = logits(model, batch)
    weights = {key: w.clone() for key, w in ScaLora(cfg.adapter).state_tensors(model).items()}
    g = torch.Generator().manual_seed(2)
    for layer in adapted_layers(model).values():
        rescale_layer(layer, None, *random_scales(cfg.adapter.r, g))
    after = logits(model, batch)
    assert all(not torch.equal(w, weights[key]) for key, w in ScaLora(cfg.adapter).state_tensors(model).items())
    assert (after - before).abs().max() <= 1e-5


def test_gradients_after_rescale_equal_a_fresh_backward(pristine, batch):
    """Check 5: grad(B)[:, k] *= beta_k, grad(A)[k, :] *= alpha_k are the gradients of the rescaled model.
    In fp64: in fp32 two backward passes through weights that differ by a rounding already disagree by
    ~1e-6 relative (measured 1.2e-6 to 3e-6 per tensor), the very bound of the check; fp64 leaves ~1e-15."""
    cfg = run_config()
    model = build(ScaLora(cfg.adapter, cfg.trainer), pristine).double()
    randomize_B(model)
    backward(model, batch)
    g = torch.Generator().manual_seed(3)
    for layer in adapted_layers(model).values():
        rescale_layer(layer, None, *random_scales(cfg.adapter.r, g))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    transformed = {name: p.grad.clone() for name, p in params.items()}
    backward(model, batch)
    for name, p in params.items():
        assert relative(transformed[name], p.grad) < 1e-6, name


def twin(model, optimizer):
    """A deep copy of (model, optimizer) with the optimizer's state and params still tied to each other;
    deepcopy drops Parameter.grad, so the gradients are copied by name."""
    model2, optimizer2 = copy.deepcopy((model, optimizer))
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in model2.named_parameters():
        p.grad = None if grads[name] is None else grads[name].clone()
    return model2, optimizer2


def adam_increments(model, optimizer) -> dict[str, torch.Tensor]:
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return {name: p.detach() - before[name] for name, p in model.named_parameters() if p.requires_grad}


def test_moment_transfer_keeps_adam_increments(pristine, batch):
    """Check 6: with the chain-rule convention, the next AdamW step moves every entry of A and B by the same
    amount whether or not a rescale came first (weight decay 0). Adam's eps is set to 1e-16 so that it does
    not blur the comparison: m / (sqrt(v) + eps) is exactly invariant only for eps = 0. The other reading
    (`moments: own`) changes the increments when alpha != beta, which this comparison must detect."""
    cfg = run_config()
    model = build(ScaLora(cfg.adapter, cfg.trainer), pristine)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0,
                                  eps=1e-16)
    for _ in range(3):  # moments and a nonzero B
        backward(model, batch)
        optimizer.step()
    backward(model, batch)
    reference = adam_increments(*twin(model, optimizer))
    for moments, same in (("chain_rule", True), ("own", False)):
        copied, copied_optimizer = twin(model, optimizer)
        g = torch.Generator().manual_seed(4)
        for layer in adapted_layers(copied).values():
            rescale_layer(layer, copied_optimizer, *random_scales(cfg.adapter.r, g), moments=moments)
        increments = adam_increments(copied, copied_optimizer)
        worst = max(relative(increments[name], reference[name]) for name in reference)
        assert (worst < 1e-5) == same, (moments, worst)


def test_unit_scales_make_scalora_bit_identical_to_lora(pristine, batch):
    """Check 4: clip = [1, 1] forces alpha = beta = 1; the merge adds exact zeros and the run (rescaling every
    step) is bit-identical to plain LoRA with the same seed: losses, adapter and base weights."""
    cfg = run_config("adapter.scalora.clip=[1.0,1.0]", "adapter.scalora.interval=1", "adapter.scalora.warmup=0")
    scalora = ScaLora(cfg.adapter, cfg.trainer, steps=6)
    model = build(scalora, pristine)
    _, losses, logs = train(scalora, model, cfg.trainer, batch, steps=6)
    lora = Lora(cfg.adapter, cfg.trainer)  # the same trainer: the same (fused) LoRA forward
    reference = build(lora, pristine)
    _, reference_losses, _ = train(lora, reference, cfg.trainer, batch, steps=6)
    assert rescaled_modules(logs) > 0 and logs[-1]["scalora_ab_min"] == logs[-1]["scalora_ab_max"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(losses, reference_losses, strict=True))
    expected = dict(reference.named_parameters())
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------
# Training behaviour (check 7) and the hook's bookkeeping
# ----------------------------------------------------------------------------------------------------------

def test_rank_grows_beyond_r_while_lora_stays_at_r(pristine, batch):
    """Check 7: after several rescales the numerical rank of W_pt,t + s B A - W_0 exceeds r in every adapted
    module; plain LoRA's update s B A (B_0 = 0) never does."""
    cfg = run_config("adapter.r=2", *EVERY_STEP)
    W0 = {key: w.clone() for key, w in pristine.state_dict().items()}
    scalora = ScaLora(cfg.adapter, cfg.trainer, steps=8)
    model = build(scalora, pristine)
    _, _, logs = train(scalora, model, cfg.trainer, batch, steps=8)
    assert rescaled_modules(logs) > 0
    ranks = {key: numerical_rank(total_update(layer, W0[key])) for key, layer in adapted_layers(model).items()}
    assert all(rank > 2 for rank in ranks.values()), ranks
    lora = Lora(cfg.adapter)
    reference = build(lora, pristine)
    train(lora, reference, cfg.trainer, batch, steps=8)
    lora_ranks = [numerical_rank(total_update(layer, W0[key])) for key, layer in adapted_layers(reference).items()]
    assert max(lora_ranks) <= 2


def test_before_clip_schedule_and_logs(pristine, batch):
    """No rescale before the warmup (null: min(100, 10% of the steps)) nor off the interval; a rescale logs the
    branch counts of every module, the quantiles of alpha*beta and, every 10th rescale, the probe's rank."""
    cfg = run_config("adapter.scalora.interval=2")
    scalora = ScaLora(cfg.adapter, cfg.trainer, steps=40)
    assert scalora.warmup == 4
    model = build(scalora, pristine)
    _, _, logs = train(scalora, model, cfg.trainer, batch, steps=6)
    assert [bool(log) for log in logs] == [False, False, False, True, False, True]
    assert sum(logs[3][f"scalora_{b}"] for b in ("column", "scalar", "skip")) == len(adapted_layers(model))
    assert logs[3]["scalora_ab_min"] <= logs[3]["scalora_ab_median"] <= logs[3]["scalora_ab_max"]
    assert "scalora_probe_rank" not in logs[3]
    assert scalora.before_clip(model, torch.optim.AdamW(model.parameters()), step=20)["scalora_probe_rank"] >= 1


def test_adam_effective_lr_without_and_with_optimizer_state():
    """eta_mode adam_effective: lr / (median sqrt(v_hat) + eps) over A's and B's entries; before the first
    step (no state) it uses grad^2, which is exactly v_hat after that step."""
    A, B = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4, 2))
    A.grad, B.grad = torch.arange(6.0).reshape(2, 3), -torch.arange(8.0).reshape(4, 2)
    optimizer = torch.optim.AdamW([A, B], lr=0.1, eps=1e-8)
    expected = 0.1 / (float(torch.cat([A.grad.flatten(), B.grad.flatten()]).abs().median()) + 1e-8)
    assert effective_lr(0.1, A, B, optimizer, "raw") == 0.1
    assert effective_lr(0.1, A, B, optimizer, "adam_effective") == pytest.approx(expected, rel=1e-12)
    optimizer.step()
    assert effective_lr(0.1, A, B, optimizer, "adam_effective") == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Artifacts: save / reload, resume, SVD export (check 9)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(pristine, batch):
    """A short ScaLoRA run with rescales: (config, variant, model, optimizer)."""
    cfg = run_config(*EVERY_STEP)
    scalora = ScaLora(cfg.adapter, cfg.trainer, steps=5)
    model = build(scalora, pristine)
    optimizer, _, logs = train(scalora, model, cfg.trainer, batch, steps=5)
    assert rescaled_modules(logs) > 0
    return cfg, scalora, model, optimizer


def test_saved_run_reloads_exactly(trained, pristine, batch, tmp_path):
    """Check 9: pristine base + base_weights.safetensors + the stock peft adapter = the trained model."""
    from peft import PeftModel

    _, scalora, model, _ = trained
    scalora.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    BASE_WEIGHTS}
    base = copy.deepcopy(pristine)
    assert sorted(apply_base_weights(base, tmp_path, required=True)) == sorted(adapted_layers(model))
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    assert (logits(reloaded, batch) - logits(model, batch)).abs().max() <= 1e-6
    # without the base weights the adapter alone is not the trained model: the merges matter
    assert (logits(PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path), batch)
            - logits(model, batch)).abs().max() > 1e-4
    # ...so `lora eval` / `merge` refuse a ScaLoRA adapter without them (or with them damaged), never load it alone.
    weights = tmp_path / BASE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupted or unreadable"):
        apply_base_weights(copy.deepcopy(pristine), tmp_path, required=True)
    weights.unlink()
    with pytest.raises(UserError, match="is missing: a ScaLoRA adapter is the base weights"):
        apply_base_weights(copy.deepcopy(pristine), tmp_path, required=True)
    assert apply_base_weights(copy.deepcopy(pristine), tmp_path, required=False) == {}


def test_resume_is_exact(trained, pristine, batch):
    """Check 9 (resume): trainable parameters by name + state_tensors, loaded into a freshly built model (another
    seed), give the same logits bit for bit, and training continues identically with the optimizer state."""
    cfg, scalora, model, optimizer = trained
    model, optimizer = copy.deepcopy((model, optimizer))
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state = {key: w.clone() for key, w in scalora.state_tensors(model).items()}
    resumed_variant = ScaLora(cfg.adapter, cfg.trainer, steps=5)
    resumed = build(resumed_variant, pristine, seed=123)
    resumed.load_state_dict(saved, strict=False)
    resumed_variant.load_state_tensors(resumed, state)
    assert torch.equal(logits(resumed, batch), logits(model, batch))
    resumed_optimizer = torch.optim.AdamW(resumed_variant.param_groups(resumed, cfg.trainer), lr=cfg.trainer.lr,
                                          weight_decay=0.0)
    # a copy, as from disk: load_state_dict keeps the very tensors it is given (`.to` is a no-op here)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _, losses, logs = train(scalora, model, cfg.trainer, batch, steps=2, optimizer=optimizer, first_step=6)
    _, resumed_losses, _ = train(resumed_variant, resumed, cfg.trainer, batch, steps=2,
                                 optimizer=resumed_optimizer, first_step=6)
    assert rescaled_modules(logs) > 0
    assert all(torch.equal(a, b) for a, b in zip(losses, resumed_losses, strict=True))
    assert torch.equal(logits(resumed, batch), logits(model, batch))


def test_svd_export_reports_its_error(trained, pristine, batch, tmp_path):
    """Check 9 (export): a full-rank export is exact (error ~ 0, logits match on the pristine base through stock
    peft); rank 1 cannot hold the high-rank update, and says so per module."""
    from peft import PeftModel

    _, _, model, _ = trained
    full = export_lowrank_adapter(model, pristine.state_dict(), rank=64, out_dir=tmp_path / "full")
    assert set(full) == set(adapted_layers(model)) and max(full.values()) < 1e-5
    exported = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "full")
    assert exported.peft_config["default"].r == exported.peft_config["default"].lora_alpha == 64
    assert (logits(exported, batch) - logits(model, batch)).abs().max() <= 1e-4
    low = export_lowrank_adapter(model, pristine.state_dict(), rank=1, out_dir=tmp_path / "low")
    assert all(0 < error < 1 for error in low.values())
    # The reported error is that of the saved fp32 factors, not of the fp64 ones they were rounded from.
    saved = load_file(tmp_path / "full" / "adapter_model.safetensors")
    pristine_weights = pristine.state_dict()
    for key, layer in adapted_layers(model).items():
        module = "base_model.model." + key.removesuffix(".weight")
        B, A = saved[f"{module}.lora_B.weight"].double(), saved[f"{module}.lora_A.weight"].double()
        update = total_update(layer, pristine_weights[key])
        saved_error = float(torch.linalg.matrix_norm(update - B @ A) / torch.linalg.matrix_norm(update))
        assert full[key] == pytest.approx(saved_error, rel=1e-6, abs=1e-12) and full[key] > 1e-12


# ----------------------------------------------------------------------------------------------------------
# Refusals and precision
# ----------------------------------------------------------------------------------------------------------

def test_refuses_a_4bit_base():
    with pytest.raises(UserError, match="4-bit"):
        compose_run(["model=tiny_llama", "adapter=scalora", "adapter.quantize=nf4"])


def test_refuses_dora_a_second_adapter_and_other_optimizers(pristine, batch):
    cfg = run_config()
    with pytest.raises(UserError, match="use_dora"):
        ScaLora(dataclasses.replace(cfg.adapter, use_dora=True), cfg.trainer).apply(copy.deepcopy(pristine))
    model = build(ScaLora(cfg.adapter, cfg.trainer), pristine)
    with pytest.raises(UserError, match="already carries an adapter"):
        ScaLora(cfg.adapter, cfg.trainer).apply(model)
    backward(model, batch)
    with pytest.raises(UserError, match="SGD"):
        ScaLora(cfg.adapter, cfg.trainer).before_clip(model, torch.optim.SGD(model.parameters(), lr=0.1), step=1)


def test_adapted_base_weights_stay_fp32_in_a_bf16_model(tiny_checkpoint, batch):
    """Thousands of small merges drift in bf16: adapted weights are held in fp32 and the model still runs."""
    cfg = run_config("model.dtype=bfloat16")
    model = build(ScaLora(cfg.adapter, cfg.trainer), load_model(tiny_checkpoint, cfg.model))
    assert all(w.dtype == torch.float32 for w in ScaLora(cfg.adapter).state_tensors(model).values())
    out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
