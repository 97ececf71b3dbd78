"""Nothing lost: a run killed at any step resumes to the bit-identical adapter and the same losses; Ctrl-C
checkpoints and says how to continue; a checkpoint of another config is refused; NaNs stop the run."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LORA, TINY, compose_run, lora, read_metrics
from safetensors.torch import load_file
from test_cli import assert_one_line_error

from lora_cli.train import cpu_has_bf16

RESUMABLE = [*TINY, "trainer.max_steps=24", "trainer.save_every=4", "trainer.eval_every=5",
             "trainer.batch_size=2", "trainer.grad_accum=2"]
# lora-bf16: what trainer.precision=auto trains LoRA in on a CPU with bf16 instructions (fp32, with a message,
# where the CPU has none); the run and its resumption must agree to the bit all the same.
VARIANTS = {"lora": ["adapter=lora"], "lora-bf16": ["adapter=lora", "trainer.precision=bf16"],
            "slora": ["adapter=slora"], "scalora": ["adapter=scalora", "adapter.scalora.interval=3"],
            "qlora": ["adapter=qlora"]}


def start(args: list[str], run_dir) -> subprocess.Popen:
    return subprocess.Popen([str(LORA), "train", "recipe=banking_support", *args, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def last_step(run_dir) -> int:
    try:
        return max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):  # not there yet, or a line half-written
        return 0


def interrupt_after(args: list[str], run_dir, step: int, sig: int) -> subprocess.Popen:
    """Start a run and send `sig` once its metrics show `step` done."""
    proc = start(args, run_dir)
    while proc.poll() is None and last_step(run_dir) < step:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()}"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sigkill_then_resume_is_bit_identical(tmp_path, variant):
    args = [*RESUMABLE, *VARIANTS[variant]]
    reference = lora("train", "recipe=banking_support", *args, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    killed = interrupt_after(args, run_dir, step=6, sig=signal.SIGKILL)  # between the step-4 and step-8 saves
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert saved and saved[-1] != f"step-{last_step(run_dir):06d}"  # killed past its newest checkpoint

    # What one changes to resume a run that ran out of memory changes no update: LoRA resumes with them.
    memory = ["trainer.gradient_checkpointing=true", "trainer.eval_batch_size=3"] if variant == "lora" else []
    resumed = lora("train", "recipe=banking_support", *args, *memory, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    expected = load_file(tmp_path / "reference/adapter/adapter_model.safetensors")
    got = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(run_dir) == losses(tmp_path / "reference")
    if variant == "lora":  # resume=auto once more: the run is complete, nothing is touched
        finished = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
        again = lora("train", "recipe=banking_support", *args, "resume=auto", f"hydra.run.dir={run_dir}")
        assert again.returncode == 0 and "complete already" in " ".join(again.stderr.split()), again.stderr
        assert finished == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    bf16 = "trainer.precision=bf16" in args and cpu_has_bf16()
    assert json.loads((run_dir / "run.json").read_text())["result"]["precision"] == ("bf16" if bf16 else "fp32")


def test_ctrl_c_checkpoints_exits_130_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*RESUMABLE, "dataset.system_prompt=Be brief and kind."]  # a value with spaces must paste back whole
    proc = interrupt_after(args, run_dir, step=3, sig=signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "eval nan" not in stderr and " eval 1" in stderr  # the step-0 eval shows before the first periodic one
    advice = stderr.splitlines()[-1].split("continue with: ")[1]
    assert advice.endswith(f"resume=auto hydra.run.dir={run_dir}")
    assert list((run_dir / "checkpoints").glob("step-*/state.json"))
    assert not (run_dir / "adapter").exists()
    program, command, *resume_args = shlex.split(advice)  # the printed command, as a shell would split it
    assert (program, command) == ("lora", "train")
    resumed = lora(command, *resume_args)
    assert resumed.returncode == 0, resumed.stderr
    assert "'dataset.system_prompt=Be brief and kind.'" in (run_dir / "README.md").read_text()  # Reproduce
    assert [s for s, _ in losses(run_dir)] == list(range(1, 25))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_in_the_end_of_run_eval_is_recorded_as_such(tmp_path, monkeypatch, sig):
    """After the adapter is written, trainer.eval_at_end runs `lora eval`; a Ctrl-C (or a scheduler's SIGTERM)
    there left no run.json, and `lora report` took the run for complete."""
    import os

    import lora_cli.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(lora_cli.evaluate, "evaluate_run", interrupted)
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.eval_at_end=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("lora: error: the end-of-run evaluation was interrupted") and \
        f"lora eval run={run_dir}" in last
    # Training completed: its record keeps the result, and says the evaluation did not finish until it has.
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["result"]["steps"] > 0 and "interrupted" in record["eval_error"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    from lora_cli.sweep import row

    assert row(run_dir, tmp_path)["status"] == "eval unfinished"
    monkeypatch.undo()
    assert lora("eval", f"run={run_dir}", "eval.max_samples=2", "eval.max_new_tokens=2").returncode == 0
    assert row(run_dir, tmp_path)["status"] == "complete"


@pytest.mark.parametrize(("sig", "eval_at_end"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_stop_while_the_run_writes_its_files_waits_for_them(tmp_path, monkeypatch, sig, eval_at_end):
    """A Ctrl-C between the adapter and the card left a run that neither counted as finished nor resumed (the
    folder held an adapter). The files are finished first; the end-of-run evaluation then does not start."""
    import os

    import lora_cli.artifacts

    real_plot = lora_cli.artifacts.plot_loss

    def stopped_while_plotting(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(lora_cli.artifacts, "plot_loss", stopped_while_plotting)
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, f"trainer.eval_at_end={eval_at_end}",
                f"hydra.run.dir={run_dir}")
    assert "Traceback" not in proc.stderr
    assert all((run_dir / name).is_file() for name in ("README.md", "loss.png", "adapter/adapter_model.safetensors"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["result"]["stopped_while_saving"]
    if eval_at_end:
        assert proc.returncode == 130 and "did not start" in proc.stderr.splitlines()[-1]
        assert not (run_dir / "eval.json").exists() and "did not start" in record["eval_error"]
    else:
        assert proc.returncode == 0, proc.stderr


def test_resume_refuses_another_config_and_non_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    killed = interrupt_after(RESUMABLE, run_dir, step=5, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert_one_line_error(lora("train", "recipe=banking_support", *RESUMABLE, f"hydra.run.dir={run_dir}"),
                          "unfinished run", "resume=auto")
    assert_one_line_error(lora("eval", f"run={run_dir}"), "unfinished run", f"resume=auto hydra.run.dir={run_dir}")
    assert_one_line_error(lora("train", "recipe=banking_support", *RESUMABLE, "trainer.lr=1e-3", "resume=auto",
                               f"hydra.run.dir={run_dir}"), "different config", "trainer.lr")
    assert_one_line_error(lora("train", "recipe=banking_support", *RESUMABLE, f"resume={tmp_path}",
                               f"hydra.run.dir={tmp_path / 'other'}"), "not a lora-cli checkpoint")
    assert_one_line_error(lora("train", "recipe=banking_support", *RESUMABLE, "resume=auto"), "hydra.run.dir")


def test_resume_refuses_a_checkpoint_of_other_examples(tmp_path):
    """Same config, edited data file: resuming would continue an order and a step count that fit neither."""
    data = tmp_path / "data.jsonl"
    data.write_text((Path(__file__).parent / "bad_inputs" / "data" / "ok.jsonl").read_text())
    args = [*TINY, "dataset=jsonl", f"dataset.path={data}", "dataset.eval_size=2", "trainer.batch_size=2",
            "trainer.max_steps=2", "trainer.save_every=1"]
    assert lora("train", "recipe=banking_support", *args, f"hydra.run.dir={tmp_path / 'run'}").returncode == 0
    step_1 = tmp_path / "run" / "checkpoints" / "step-000001"
    data.write_text(data.read_text().replace("Freeze it in the app.", "Call us."))
    assert_one_line_error(lora("train", "recipe=banking_support", *args, f"resume={step_1}",
                               f"hydra.run.dir={tmp_path / 'again'}"), "trained on other examples",
                          "files changed")


def test_checkpoints_are_pruned_to_the_newest(tmp_path):
    proc = lora("train", "recipe=banking_support", *RESUMABLE, "trainer.keep_checkpoints=2",
                f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000016", "step-000020"]
    # The dry-run of a resume plans the steps left, and no eval before them (RESUMABLE: 24 steps, eval every 5).
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000016").rename(unfinished / "checkpoints" / "step-000016")
    plan = lora("train", "--dry-run", "recipe=banking_support", *RESUMABLE, "resume=auto",
                f"hydra.run.dir={unfinished}")
    assert plan.returncode == 0, plan.stderr
    shown = " ".join(plan.stdout.split())
    assert "resuming after step 16" in shown and "for 2 evals" in shown  # after 20 and after 24


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    proc = lora("train", "recipe=banking_support", *RESUMABLE, "trainer.lr=1e30", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress output of the steps that did run
    assert "non-finite" in last and "at step" in last and "trainer.on_nonfinite=skip" in last, last
    assert not (tmp_path / "adapter").exists()


def test_skip_drops_non_finite_steps_and_trains_on(tmp_path, monkeypatch):
    from lora_cli import train as train_module

    real = train_module.token_loss_sum
    calls = {"n": 0}

    def nan_on_third_step(model, head, batch):  # two micro-batches per step: training calls 5, 6 are step 3
        calls["n"] += model.training
        loss = real(model, head, batch)
        return loss * float("nan") if model.training and calls["n"] in (5, 6) else loss

    monkeypatch.setattr(train_module, "token_loss_sum", nan_on_third_step)
    cfg = compose_run(["recipe=banking_support", *RESUMABLE, "trainer.max_steps=5", "trainer.on_nonfinite=skip"])
    train_module.train(cfg, tmp_path, "test")
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r.get("skipped") for r in records] == [None, None, "non-finite", None, None]
    assert records[2]["loss"] is None and all(r["loss"] > 0 for r in records if "skipped" not in r)  # strict JSON
    lora_b = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in lora_b.values())


def test_skip_that_ends_in_a_non_finite_model_saves_no_adapter(tmp_path):
    """trainer.on_nonfinite=skip with a learning rate that blows the adapter up: every later step is skipped and
    the run ended 'complete' with a NaN eval loss and an adapter that looked finished."""
    run_dir = tmp_path / "run"
    proc = lora("train", "recipe=banking_support", *TINY, "trainer.max_steps=4", "trainer.lr=1e30",
                "trainer.on_nonfinite=skip", f"hydra.run.dir={run_dir}")
    assert_ends_in_one_line(proc, "non-finite eval loss", "steps were skipped", "lower trainer.lr")
    assert not (run_dir / "adapter").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    """resume=auto takes the newest and pruning drops the oldest: 'step-1000000' sorts before 'step-999999' as
    text, which would have resumed an older state and pruned the newest."""
    from lora_cli.rundir import STATE, complete_checkpoints, step_dir

    for step in (999_999, 1_000_000, 20):
        step_dir(tmp_path, step).mkdir(parents=True)
        (step_dir(tmp_path, step) / STATE).write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000020", "step-999999", "step-1000000"]


def assert_ends_in_one_line(proc, *needles: str) -> None:
    """A run that trained a while and then failed: its progress, then one error line (exit 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lora: error: ") and all(n in last for n in needles), last


def test_a_full_disk_is_one_line_and_the_run_resumes_once_freed(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error, not an OSError: a checkpoint or the final adapter that
    does not fit ended in a traceback. Now one line, the earlier checkpoints intact, and resume=auto finishes."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save = safetensors.torch.save_file
    full = {"step-000004", ".adapter.partial-"}

    def save_file(tensors, filename, metadata=None):
        if any(name in str(filename) for name in full):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    args = [*RESUMABLE, "trainer.max_steps=6", "trainer.save_every=2", f"hydra.run.dir={tmp_path / 'run'}"]
    assert_ends_in_one_line(lora("train", "recipe=banking_support", *args),
                            "out of disk space while writing checkpoint", "resume=auto")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    full.discard("step-000004")
    assert_ends_in_one_line(lora("train", "recipe=banking_support", *args, "resume=auto"),
                            "out of disk space while writing the adapter", "resume=auto")
    assert not (tmp_path / "run" / "adapter").exists()
    full.clear()
    resumed = lora("train", "recipe=banking_support", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_damaged_checkpoint_is_named_with_the_one_to_use_instead(tmp_path):
    """A checkpoint file removed or cut short after it was written ended resume=auto in a traceback (safetensors,
    JSON or a missing file) halfway through loading; every file is checked first."""
    import shutil

    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=2"]
    finished = tmp_path / "finished"
    assert lora("train", "recipe=banking_support", *args, f"hydra.run.dir={finished}").returncode == 0
    shutil.rmtree(finished / "adapter")  # as if stopped after the step-4 checkpoint
    damages = {"model.safetensors": "cut", "optimizer.safetensors": "remove", "rng.safetensors": "cut",
               "metrics.jsonl": "remove", "config.yaml": "remove", "state.json": "cut"}
    for name, damage in damages.items():
        run_dir = tmp_path / name
        shutil.copytree(finished, run_dir)
        file = run_dir / "checkpoints" / "step-000004" / name
        if damage == "remove":
            file.unlink()
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        assert_one_line_error(lora("train", "recipe=banking_support", *args, "resume=auto", f"hydra.run.dir={run_dir}"),
                              "step-000004 is damaged", name, f"resume={run_dir / 'checkpoints' / 'step-000002'}")
    shutil.rmtree(tmp_path / "state.json" / "checkpoints" / "step-000002")
    assert_one_line_error(lora("train", "recipe=banking_support", *args, "resume=auto",
                               f"hydra.run.dir={tmp_path / 'state.json'}"), "the run's only one: start a new run")


def test_the_continue_command_pastes_back_for_any_run_dir_name(tmp_path, monkeypatch):
    """A run dir with spaces, a comma, a quote and non-ASCII letters: quoted for Hydra, the checks before Hydra
    see the folder itself (they saw the quotes and checked nothing), and the printed continue command, quoted for
    Hydra inside the shell's quoting, resumes the run (unquoted it did not parse)."""
    import os

    import lora_cli.train

    real_take, calls = lora_cli.train.take, []

    def take_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints at the end of step 2
        return real_take(*args, **kwargs)

    monkeypatch.setattr(lora_cli.train, "take", take_then_stop)
    run_dir = tmp_path / "Jo's run, ünï"
    quoted = "'" + str(run_dir).replace("'", "\\'") + "'"
    stopped = lora("train", "recipe=banking_support", *RESUMABLE, "trainer.max_steps=4", f"hydra.run.dir={quoted}")
    assert stopped.returncode == 130, stopped.stderr
    advice = stopped.stderr.splitlines()[-1].split("continue with: ")[1]
    monkeypatch.undo()
    program, command, *resume_args = shlex.split(advice)
    resumed = lora(command, *resume_args)
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]
    again = lora("train", "recipe=banking_support", *RESUMABLE, "trainer.lr=0.5", f"hydra.run.dir={quoted}")
    assert_one_line_error(again, "already holds a trained adapter")
    assert "trainer.lr=0.5" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # refused before Hydra


def test_a_run_dir_another_run_is_writing_into_is_refused(tmp_path):
    """Two runs started in the same second share the default run dir: the second one is refused in one line and
    writes nothing there (they interleaved their metrics and one adapter overwrote the other)."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")  # what the first run has written when the second one starts
    with open(run_dir / ".lock", "w") as held:  # the first run, still training
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = lora("train", "recipe=banking_support", *TINY, f"hydra.run.dir={run_dir}")
    assert_one_line_error(second, "another lora run is writing into", "pick another hydra.run.dir")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".lock", "metrics.jsonl"]
    assert lora("train", "recipe=banking_support", *TINY, f"hydra.run.dir={run_dir}").returncode == 0  # once free
