"""Every shipped config option and recipe composes and validates against the typed schema."""

from __future__ import annotations

import pytest
import yaml
from conftest import compose_run

from lora_cli.paths import shipped_dir

# Options that need a user-supplied value to be complete.
REQUIRED = {("dataset", "jsonl"): ["dataset.path=x.jsonl"], ("dataset", "csv"): ["dataset.path=x.csv"],
            ("model", "hf"): ["model.name_or_path=some/model"]}
OPTIONS = [(group.name, option.stem) for group in sorted(shipped_dir("configs").iterdir()) if group.is_dir()
           for option in sorted(group.glob("*.yaml"))]
RECIPES = sorted(p.stem for p in shipped_dir("recipes").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_config_option_composes(group, option):
    cfg = compose_run([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_opens_with_its_command(recipe):
    compose_run([f"recipe={recipe}"])
    text = (shipped_dir("recipes") / f"{recipe}.yaml").read_text()
    assert f"lora train recipe={recipe}" in text


def test_command_line_beats_recipe():
    cfg = compose_run(["recipe=banking_support", "model=tiny_llama", "trainer.max_steps=3"])
    assert cfg.model.source == "random" and cfg.trainer.max_steps == 3
    recipe = yaml.safe_load((shipped_dir("recipes") / "banking_support.yaml").read_text())
    assert compose_run(["recipe=banking_support"]).trainer.max_steps == recipe["trainer"]["max_steps"] != 3
