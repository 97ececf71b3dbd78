"""An installed (non-editable) wheel finds its configs, recipes, launcher files and shipped data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_wheel_ships_configs_recipes_and_data(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
             str(REPO)]
    assert subprocess.run(build, capture_output=True, text=True).returncode == 0
    wheel = next(wheels.glob("lora_cli-*.whl"))
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    assert subprocess.run(install, capture_output=True, text=True).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import lora_cli, lora_cli.paths as p, lora_cli.data as d; "
             "print(lora_cli.__file__, p.shipped_dir('configs'), p.shipped_dir('recipes'), "
             "p.shipped_dir('launchers'), d.resolve_path('builtin://banking_support').joinpath('train.jsonl').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert out.returncode == 0, out.stderr
    module, configs, recipes, launchers, has_data = out.stdout.split()
    assert all(path.startswith(str(target)) for path in (module, configs, recipes, launchers)) and has_data == "True"
    from lora_cli.config import LAUNCHERS

    assert sorted(p.stem for p in Path(launchers).glob("*.yaml")) == sorted(LAUNCHERS)
    cfg = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--cfg", "job", "recipe=banking_support"],
                         capture_output=True, text=True, cwd=elsewhere, env=env)
    assert cfg.returncode == 0, cfg.stderr
    assert "name: banking_support" in cfg.stdout
