"""Check command-line overrides before Hydra runs, so a typo is one line that names the nearest valid key
or option, not a multi-line composition error after a run dir was made."""

from __future__ import annotations

import re
from pathlib import Path

from lora_cli.errors import UserError, did_you_mean, first_line

# Hydra flags that take the next argument as their value.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun"}
HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def split_argv(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides = [], []
    take_value = False
    for arg in args:
        if take_value or arg.startswith("-"):
            flags.append(arg)
            take_value = arg in FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return flags, overrides


def group_options(configs_dir: Path, recipes_dir: Path) -> dict[str, list[str]]:
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in configs_dir.iterdir() if d.is_dir()}
    groups["recipe"] = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
    return groups


def parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(f"cannot parse overrides: {first_line(exc)}; quote a value that holds spaces, "
                        "commas or brackets, e.g. \"key='a value'\"") from None


def hydra_quoted(value: str) -> str:
    """`value` as an override value Hydra reads back unchanged: bare where it is plain, else single-quoted (a
    path with spaces, commas or non-ASCII letters is a syntax error or a sweep, bare)."""
    if re.fullmatch(r"[A-Za-z0-9_./:~+@%-]+", value):
        return value
    # Hydra reads a backslash literally except in a run before a quote or at the end, where they pair up.
    escaped = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"


def value_of(arg: str):
    """The value of one `KEY=VALUE` override as Hydra reads it: quotes removed; a list of values for a sweep."""
    override = parse([arg])[0]
    return _values(override) if override.is_sweep_override() else str(override.value())


def _values(override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [override.get_value_element_as_str()]


def _leaf_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys.extend(_leaf_keys(child, full + "."))
    return keys


# Keys that exist only under one option of a group, or only once added with '+': the fix, not the nearest name.
OPTION_KEYS = {"adapter.scale.": "adapter=slora", "adapter.scalora.": "adapter=scalora"}
ADDED_MAPS = ("dataset.rename_columns.",)


def check_key(cfg, key: str, help_command: str = "train") -> None:
    """A key that is not in the config is a typo until proven otherwise: name the nearest one."""
    from omegaconf import DictConfig, OmegaConf

    if _key_exists(cfg, key):
        return
    option = next((option for prefix, option in OPTION_KEYS.items() if key.startswith(prefix)), None)
    if option and not isinstance(OmegaConf.select(cfg, key.rsplit(".", 1)[0]), DictConfig):  # null on other options
        raise UserError(f"{key} is a setting of {option}; add {option} to the command (or drop {key})")
    if key.startswith(ADDED_MAPS):
        raise UserError(f"{key} adds an entry to a map: write it with a '+' (+{key}=...)")
    raise UserError(f"unknown config key {key!r}; {did_you_mean(key, _leaf_keys(cfg), cutoff=0.5)}"
                    f"`lora {help_command} --help` lists every key")


def check_addable(cfg, key: str) -> None:
    """`+KEY=VALUE` adds a key where the config has free-form entries (`+dataset.rename_columns.OLD=NEW`); under a
    typed group every key already exists, so a `+` key there is a typo that would be dropped without a word, and
    under a key that is null (`+adapter.scale.init` without adapter=slora) there is nothing to add it to. Under a
    free-form map, nested entries are the map's (`+model.architecture.rope_scaling.type=linear`)."""
    from omegaconf import DictConfig, OmegaConf

    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and not _key_exists(cfg, parent):  # the nearest node that exists
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or OmegaConf.get_type(node) not in (dict, None):
        check_key(cfg, key)


def _key_exists(cfg, key: str) -> bool:
    from omegaconf import DictConfig

    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():  # noqa: SIM118 (`in` skips ??? values)
            return False
        node = node._get_node(part)
    return True


def check(configs_dir: Path, recipes_dir: Path, args: list[str], config_name: str = "train"):
    """Validate overrides against the config tree; returns the composed config (first sweep values).

    Every value of a sweep is composed too, so a type error anywhere in `adapter.r=4,x` stops the sweep
    before it starts; values that type-check but are invalid (r=0) fail their own job only."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    flags, overrides = split_argv(args)
    parsed = parse(overrides)
    groups = group_options(configs_dir, recipes_dir)
    group_choices, all_choices, key_overrides, added, sweeps, hydra_overrides = [], [], [], [], [], []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            hydra_overrides += [] if override.is_sweep_override() else [override]
            continue
        values = _values(override)
        # Sweeps are checked by key here and by value in each job; compose with the first value.
        first = override.input_line if override.is_delete() else f"{override.get_key_element()}={values[0]}"
        sweeps += [(len(all_choices), f"{override.get_key_element()}={v}") for v in values[1:]]
        all_choices.append(first)
        if key in groups and override.package is None:
            check_group(key, values, groups[key])
            group_choices.append(first)
        elif override.is_add():
            added.append(key)
        elif not override.is_delete():
            key_overrides.append(key)
    listed = next((o for o in parsed if o.is_sweep_override()), None)
    if listed and not {"-m", "--multirun"} & set(flags):
        raise UserError(f"{listed.input_line}: a comma makes this a list of values, which is a sweep: add -m for one "
                        "run per value (lora train -m ...), or quote the value if the comma is part of it: "
                        f"\"{listed.key_or_group}='...'\"")
    with initialize_config_dir(str(configs_dir), version_base="1.3"):
        try:
            skeleton = compose(config_name, overrides=group_choices)
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(f"invalid config: {one_line(exc)}") from None
        for key in key_overrides:
            check_key(skeleton, key)
        for key in added:
            check_addable(skeleton, key)
        check_hydra_overrides(compose, config_name, group_choices, hydra_overrides)
        try:
            for index, choice in sweeps:
                compose(config_name, overrides=[*all_choices[:index], choice, *all_choices[index + 1:]])
            return compose(config_name, overrides=all_choices)
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(f"invalid override: {one_line(exc)}") from None


def check_hydra_overrides(compose, config_name: str, group_choices: list[str], overrides: list) -> None:
    """`hydra.*` keys and `hydra/` groups, checked as the others are: a typo (hydra.run.dirr) or a launcher plugin
    that is not installed (hydra/launcher=joblib) was Hydra's multi-line error after the start."""
    if not overrides:
        return
    groups = [o.input_line for o in overrides if o.key_or_group.startswith("hydra/")]
    with_hydra = _compose_hydra(compose, config_name, [*group_choices, *groups])  # a missing plugin fails here,
    for override in overrides:  # before the keys it brings (hydra.launcher.n_jobs) look unknown
        if not override.key_or_group.startswith("hydra/") and not override.is_add() and not override.is_delete():
            check_key(with_hydra, override.key_or_group)
    _compose_hydra(compose, config_name, [*group_choices, *(o.input_line for o in overrides)])


def _compose_hydra(compose, config_name: str, overrides: list[str]):
    """The config with Hydra's own part, or a one-line error; a launcher or sweeper that fails is most likely a
    plugin not installed."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        plugin = next((o for o in overrides if o.startswith(("hydra/launcher=", "hydra/sweeper="))), None)
        hint = f"; {plugin} needs its Hydra plugin installed ({plugin_package(plugin)})" if plugin else ""
        raise UserError(f"invalid Hydra override: {one_line(exc)}{hint}") from None


def plugin_package(choice: str) -> str:
    """Where Hydra's official plugin for `hydra/launcher=joblib` (or submitit_local, optuna...) comes from."""
    group, name = choice.removeprefix("hydra/").split("=", 1)
    return f"pip install hydra-{name.split('_')[0]}-{group}"


def check_group(group: str, values: list[str], options: list[str]) -> None:
    for value in values:
        if value == "null" and group != "recipe":  # every run needs a model, a dataset, an adapter, a trainer
            raise UserError(f"{group}=null: every run needs one; pick one of: {', '.join(options)}")
        if value not in options and value != "null":
            hint = did_you_mean(value, options, shown=f"{group}={{}}")
            raise UserError(f"{group}={value}: no such {group}; {hint}options: {', '.join(options)}")


def one_line(exc: Exception) -> str:
    """Hydra and OmegaConf errors span lines; keep the message and the key it names, and the fix where the key
    says it: a `${...}` that does not resolve (how to write one meant literally), a map given whole
    (`dataset.rename_columns={question:prompt}` is refused key by key: it takes its entries one by one)."""
    from omegaconf.errors import InterpolationKeyError

    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    message = lines[0] if lines else type(exc).__name__
    message = f"{message} (key: {full_key})" if full_key and full_key not in message else message
    if isinstance(cause, InterpolationKeyError):
        message += "; ${...} refers to another key (${dataset.name}); write \\${...} for the text itself"
    elif full_key and full_key.startswith(ADDED_MAPS):
        message += f"; add a map's entries one by one: +{full_key}=..."
    return message


def run_dir(configs_dir: Path, recipes_dir: Path, args: list[str], config_name: str = "train") -> str:
    """The run dir Hydra would make for these overrides (hydra.run.dir, resolved now)."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import OmegaConfBaseException

    _, overrides = split_argv(args)
    with initialize_config_dir(str(configs_dir), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    try:
        return str(cfg.hydra.run.dir)
    except OmegaConfBaseException as exc:
        raise UserError(f"invalid config: {one_line(exc)}") from None
