"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case through the real `lora train`, which must
refuse it the way a user can act on: exit != 0, one line on stderr naming the key or file (and line), no
traceback, and no run dir left with an adapter that looks finished."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import lora
from test_cli import assert_one_line_error

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
# Every case runs on this command plus its own args: the tiny random model, two steps on a few examples, so a
# case that wrongly passes costs seconds, not a real training run.
BASE = ["recipe=banking_support", "model=tiny_llama", "trainer.max_steps=2", "trainer.batch_size=2",
        "trainer.eval_every=2", "dataset.max_train_examples=8", "dataset.max_eval_examples=4"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A real finished run of BASE that also kept a checkpoint (step 1 of 2): the run-dir and resume cases
    need both, and one tiny training gives them."""
    run_dir = tmp_path_factory.mktemp("bad_inputs") / "finished"
    proc = lora("train", *BASE, "trainer.save_every=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-000001" / "state.json").is_file()
    return run_dir


def copy_finished_run(tmp: Path, run_dir: Path, request) -> None:
    shutil.copytree(request.getfixturevalue("finished_run"), run_dir)


def copy_unfinished_run(tmp: Path, run_dir: Path, request) -> None:
    """Checkpoints but no adapter: what a run killed part-way leaves."""
    shutil.copytree(request.getfixturevalue("finished_run") / "checkpoints", run_dir / "checkpoints")


def make_unreadable_file(tmp: Path, run_dir: Path, request) -> None:
    """chmod 000 keeps a normal user out, not root, so as root the case cannot be made and is skipped."""
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads a chmod 000 file anyway")
    path = tmp / "unreadable.jsonl"
    shutil.copy(CORPUS / "data" / "ok.jsonl", path)
    path.chmod(0)
    request.addfinalizer(lambda: path.chmod(0o644))  # so pytest can clean the temp folder


def make_user_folder(tmp: Path, run_dir: Path, request) -> None:
    """A user's project folder whose names a lora run also uses: a README.md that a run would overwrite, beside
    a `checkpoints/` folder, a metrics.jsonl and a run.json of the user's own."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "README.md").write_text("my project\n")
    (run_dir / "metrics.jsonl").write_text("accuracy,0.9\n")
    (run_dir / "run.json").write_text('{"experiment": 3}')


SETUPS = {"finished_run": copy_finished_run, "unfinished_run": copy_unfinished_run,
          "unreadable_file": make_unreadable_file, "user_folder": make_user_folder}


def command(case: dict, tmp: Path, run_dir: Path, request) -> list[str]:
    """BASE with the case's args on top (an arg for a key BASE sets replaces it), placeholders filled in."""
    args = [a.replace("{tmp}", str(tmp)) for a in case["args"]]
    if any("{checkpoint}" in a for a in args):
        checkpoint = request.getfixturevalue("finished_run") / "checkpoints" / "step-000001"
        args = [a.replace("{checkpoint}", str(checkpoint)) for a in args]
    keys = {a.split("=", 1)[0] for a in args}
    run = [f"hydra.run.dir={run_dir}"] if case.get("run_dir", True) else []
    return [*(a for a in BASE if a.split("=", 1)[0] not in keys), *args, *run]


def adapters(folder: Path) -> dict[str, str]:
    """Every adapter weights file under `folder` with its content hash: none may appear, none may change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("adapter_model.safetensors")}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_refused_in_one_line(case, tmp_path, request):
    run_dir = tmp_path / "run"
    if "setup" in case:
        SETUPS[case["setup"]](tmp_path, run_dir, request)
    adapters_before, corpus_before = adapters(tmp_path), files(CORPUS)

    proc = lora("train", *command(case, tmp_path, run_dir, request), cwd=CORPUS)

    assert_one_line_error(proc, *case["needles"])
    assert proc.stderr.startswith("lora: error: "), proc.stderr
    assert adapters(tmp_path) == adapters_before  # nothing trained; a finished run's adapter untouched
    assert files(CORPUS) == corpus_before  # the CLI runs in the corpus folder: it must write nothing there


def test_cases_are_unique_and_complete():
    """A typo in cases.yaml should fail here, not as a confusing CLI error."""
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 28
    for case in CASES:
        assert set(case) <= {"id", "args", "needles", "setup", "run_dir"}, case["id"]
        assert case["needles"] and case.get("setup", "finished_run") in SETUPS, case["id"]
