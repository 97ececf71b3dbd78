"""The `lora` command: pick the subcommand, check the overrides, hand over to Hydra.

Only the standard library is imported at module level, so `lora --help` answers at once; torch,
transformers and Hydra load inside the command that needs them.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

from lora_cli import __version__
from lora_cli.errors import UserError, did_you_mean, first_line

USAGE = """\
usage: lora COMMAND [GROUP=OPTION ...] [KEY=VALUE ...]

Fine-tune a frozen base model with a low-rank adapter, measure it, ship it.

commands:
  train      fine-tune: lora train recipe=banking_support [adapter.r=8 ...]  (-m sweeps comma lists)
  eval       adapter vs base model: lora eval run=RUN_DIR [dataset.eval_split=test eval.max_samples=200 ...]
  generate   try it: lora generate run=RUN_DIR prompt="I lost my card"  (no prompt: chat; adapter=false: base)
  merge      ship it: lora merge run=RUN_DIR output=OUT_DIR  (verified full checkpoint, no peft needed to load)
  report     compare runs: lora report SWEEP_DIR [metric=eval_loss|accuracy|...]  (summary.csv, summary.png)

Every command takes Hydra overrides. `lora train --help` lists the config groups and every key;
`lora COMMAND --help` the keys of the others. `lora train --dry-run ...` checks a run and plans it (steps, time,
memory) without training; `lora train --cfg job ...` prints the composed config. Add --debug (or debug=true) to
see tracebacks.
"""
COMMANDS = ("train", "eval", "generate", "merge", "report")
# Arguments of the commands that read a finished run; everything else is a config override.
NAMED_ARGS = {"eval": ("run",), "generate": ("run", "prompt"), "merge": ("run", "output")}
REQUIRED_ARGS = {"eval": ("run",), "generate": ("run",), "merge": ("run", "output")}


def fail(message: str) -> int:
    """A user error: one line on stderr, exit code 2. Under accelerate launch every process meets the same error;
    the main process alone says so."""
    from lora_cli import launched

    if launched.rank() == 0:
        sys.stderr.write(f"lora: error: {message}\n")
    return 2


# Hydra's own flags (`lora train --hydra-help`), and ours.
TRAIN_FLAGS = {"--dry-run", "--debug", "-m", "--multirun", "--run", "-r", "--cfg", "-c", "--resolve", "--package", "-p",
               "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--version"}

# Hydra's run modes, of which it takes one: the flags that pick each (Hydra itself raised a ValueError).
HYDRA_MODES = {"--run": "run", "-r": "run", "-m": "multirun", "--multirun": "multirun", "--cfg": "cfg", "-c": "cfg",
               "--info": "info", "-i": "info", "--shell-completion": "completion", "-sc": "completion"}


def config_groups() -> str:
    """The groups and their options, as `lora train --help` lists them: what GROUP=OPTION can pick."""
    from lora_cli.overrides import group_options
    from lora_cli.paths import shipped_dir

    groups = group_options(shipped_dir("configs"), shipped_dir("recipes"))
    return "\nconfig groups (GROUP=OPTION):\n" + "".join(f"  {name:<9}  {', '.join(options)}\n"
                                                         for name, options in sorted(groups.items()))


def command_help(command: str) -> str:
    """`lora eval|generate|merge|report --help`: the usage line, then the command's own keys with their defaults
    (read from configs/train.yaml, so the help cannot drift from them)."""
    from omegaconf import OmegaConf

    from lora_cli.paths import shipped_dir

    usage = next(line.split(": ", 1)[1] for line in USAGE.splitlines() if line.strip().startswith(command + " "))
    if command == "report":
        return f"usage: {usage}\n"
    keys = OmegaConf.load(shipped_dir("configs") / "train.yaml")[command]
    lines = [f"  {command}.{key}={'null' if value is None else value}" for key, value in keys.items()]
    return (f"usage: {usage}\n\nkeys of `lora {command}` (defaults):\n" + "\n".join(lines) +
            "\n\nThe run's own settings (dataset.*, model.*) can be overridden too, e.g. dataset.eval_split=test.\n")


def with_known_flags(command: str, args: list[str]) -> list[str]:
    """The arguments without `--debug` (for `lora train`, with the `debug=true` it stands for: the job reads it;
    main() reads it for the others); an option the command does not take is an error naming the nearest one
    (`--dryrun` was Hydra's ten-line usage)."""
    takes = TRAIN_FLAGS if command == "train" else {"--debug"}
    unknown = [a for a in args if a.startswith("-") and "=" not in a and a not in takes]
    if unknown:
        raise UserError(f"unknown option {unknown[0]} for `lora {command}`; {did_you_mean(unknown[0], sorted(takes))}"
                        f"see `lora {command} --help`")
    debug = ["debug=true"] if "--debug" in args and command == "train" else []  # the others: main() reads it
    return [a for a in args if a != "--debug"] + debug


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE + config_groups(), end="")
        return 0
    if args[0] == "--version":
        print(f"lora-cli {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        hint = did_you_mean(command, COMMANDS, "`lora {}`")
        return fail(f"unknown command {command!r}; {hint}commands: {', '.join(COMMANDS)}")
    if command != "train" and {"-h", "--help"} & set(rest):
        print(command_help(command), end="")
        return 0
    debug = "debug=true" in rest or "--debug" in rest or bool(os.environ.get("LORA_CLI_DEBUG"))
    try:
        rest = with_known_flags(command, rest)
        if command == "train":
            return run_train(rest)
        if command == "report":
            return run_report(rest)
        return run_on_finished_run(command, rest)
    except UserError as exc:
        if debug:
            raise
        return fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("lora: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader left (`lora generate ... | head -n 1`): stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no closed pipe
        return 141  # 128 + SIGPIPE, what a shell reports for such a writer


def run_train(args: list[str]) -> int:
    """`lora train`: validate the overrides, then let Hydra compose, make the run dir and call the job."""
    import hydra

    from lora_cli import launched, overrides
    from lora_cli.config import register_recipes, register_schemas
    from lora_cli.paths import shipped_dir

    if os.environ.get(launched.DIE_WITH_PARENT):  # a worker of `launched.launch`: it ends with the launch
        launched.die_with_parent()
    configs, recipes = shipped_dir("configs"), shipped_dir("recipes")
    register_schemas()
    register_recipes(recipes)
    if "--dry-run" in args:
        return dry_run([a for a in args if a != "--dry-run"], configs, recipes)
    flags, _ = overrides.split_argv(args)
    modes = [f for f in flags if f in HYDRA_MODES]
    if len({HYDRA_MODES[f] for f in modes}) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined: each picks what lora train does (run, sweep, print "
                        "the config, show Hydra's info); keep one")
    if not overrides.HELP_FLAGS.intersection(flags):
        composed = overrides.check(configs, recipes, args)
        if not ({"-m", "--multirun", "--cfg", "-c"} & set(flags)):
            from lora_cli.config import to_run_config

            run = to_run_config(composed)  # value checks (r > 0, ...) before Hydra creates a run dir
            if launched.world_size() > 1:  # `accelerate launch` by hand: the run is on the processes it started
                run.trainer.num_processes = launched.world_size()  # (as train_job records it), resumed too
            run_dir = given_run_dir(args, configs, recipes)
            preflight(run, run_dir)
            if launched.world_size() > 1:
                if not run_dir:
                    raise UserError("under accelerate launch every process must write the same run dir; add "
                                    "hydra.run.dir=RUN_DIR")
                if launched.rank() > 0:  # one process writes Hydra's .hydra/ record of the run
                    args = [*args, "hydra.output_subdir=null"]
            elif run.trainer.num_processes > 1:
                return launched.launch(args, run.trainer, run_dir or overrides.run_dir(configs, recipes, args))
        elif ({"-m", "--multirun"} & set(flags)) and Path(given(args, "hydra.sweep.dir") or ".").is_file():
            raise UserError(f"hydra.sweep.dir={given(args, 'hydra.sweep.dir')} is a file, not a folder; pick a new "
                            "or empty folder")
        elif ({"-m", "--multirun"} & set(flags)) and any(
                a.startswith("trainer.num_processes=") and a != "trainer.num_processes=1" for a in args):
            raise UserError("trainer.num_processes>1 runs one job on several processes; it cannot be swept "
                            "with -m (run the jobs one by one)")
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # hydra.main leaves itself initialised: a second main() in one process needs this
    sys.argv = ["lora train", *args]
    hydra.main(config_path=str(configs), config_name="train", version_base="1.3")(train_job)()
    return 0


def given(args: list[str], key: str) -> str | None:
    """The value of `KEY=VALUE` on the command line, if given, as Hydra reads it (quotes removed: a quoted run dir
    skipped every check made before Hydra)."""
    from lora_cli.overrides import value_of

    arg = next((a for a in args if a.startswith(f"{key}=")), None)
    value = value_of(arg) if arg is not None else None
    return ",".join(value) if isinstance(value, list) else value


def given_run_dir(args: list[str], configs: Path, recipes: Path) -> str | None:
    """hydra.run.dir as given, resolved as Hydra will where it interpolates (e.g. 'runs/r${adapter.r}'); given
    empty, it is the working folder, as for Hydra."""
    from lora_cli import overrides

    run_dir = given(args, "hydra.run.dir")
    if run_dir is not None and not run_dir.strip():
        return "."
    return overrides.run_dir(configs, recipes, args) if run_dir and "${" in run_dir else run_dir


def preflight(run, run_dir: str | None) -> None:
    """The checks that need no model, made before Hydra creates a run dir: the launcher, the end-of-run eval's
    label mode, the run dir's rules, the checkpoint to resume from, the data files and their rows."""
    from lora_cli.artifacts import config_yaml
    from lora_cli.checkpoint import check_same_run, resolve_resume
    from lora_cli.config import with_absolute_paths
    from lora_cli.data import load_train_eval
    from lora_cli.labels import check_label_mode
    from lora_cli.launched import check_launcher
    from lora_cli.report import quiet_libraries
    from lora_cli.rundir import check_run_dir

    check_launcher(run)
    if run.trainer.eval_at_end:  # else a label mode that cannot score this dataset fails after the training
        check_label_mode(run.eval.label_mode, run.dataset, "eval.label_mode")
    if run_dir:
        check_run_dir(Path(run_dir), run.resume)
    elif run.resume == "auto":
        raise UserError("resume=auto continues the run in hydra.run.dir; add hydra.run.dir=RUN_DIR")
    resume_from = resolve_resume(run.resume, Path(run_dir or "."))
    if resume_from:
        check_same_run(resume_from, config_yaml(with_absolute_paths(run)))  # as the checkpoint keeps it
    quiet_libraries()
    load_train_eval(run.dataset)


def dry_run(args: list[str], configs: Path, recipes: Path) -> int:
    """`lora train --dry-run ...`: every check a run makes before training, then the plan; nothing is written."""
    from lora_cli import overrides
    from lora_cli.config import to_run_config
    from lora_cli.report import print_plan

    flags, _ = overrides.split_argv(args)
    if flags:
        raise UserError(f"--dry-run plans one run; drop {' '.join(flags)}")
    run = to_run_config(overrides.check(configs, recipes, args))
    run_dir = given_run_dir(args, configs, recipes)
    preflight(run, run_dir)
    from lora_cli.plan import plan

    print_plan(plan(run, Path(run_dir) if run_dir else None))
    return 0


def train_job(cfg) -> str | None:
    """One Hydra job. It always leaves run.json (complete, or failed with the reason). A user error ends a
    single run with one line and exit 2; in a sweep it marks the job failed and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lora_cli import launched
    from lora_cli.artifacts import config_yaml
    from lora_cli.checkpoint import check_same_run
    from lora_cli.config import to_run_config, with_absolute_paths
    from lora_cli.errors import Interrupted
    from lora_cli.overrides import hydra_quoted
    from lora_cli.report import console, quiet_libraries
    from lora_cli.rundir import check_run_dir, claim_run_dir, complete_checkpoints, write_run_record
    from lora_cli.sweep import REFUSED

    quiet_libraries()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    from_scratch = reproducing_overrides(hydra_cfg.overrides.task, cfg)
    command = shlex.join(["lora", "train", *from_scratch])
    record = {"overrides": [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")],  # not a setting
              "variant": cfg.adapter.name, "r": cfg.adapter.r, "alpha": cfg.adapter.alpha}

    def finish(status: str, message: str | None = None, **fields) -> None:
        if launched.rank() == 0:  # under accelerate launch, the main process alone records and reports
            write_run_record(run_dir, {"status": status, **record, **fields})
        if message:
            fail(message)

    try:
        # A sweep's job dir (or the default timestamped one) holding another run: refused before this job writes
        # anything of its own there, run.json included, so the other run's record stays as it was.
        check_run_dir(run_dir, cfg.get("resume"), "hydra.sweep.dir" if in_sweep else "hydra.run.dir")
        if cfg.get("resume") == "auto" and (run_dir / "adapter").exists():  # e.g. a sweep cut short, run again
            check_same_run(run_dir, config_yaml(with_absolute_paths(to_run_config(cfg))))  # to finish its other jobs
            console.print(f"{run_dir}: this run is complete already (resume=auto); nothing to do")
            return None
        claim = claim_run_dir(run_dir) if launched.rank() == 0 else None  # noqa: F841 (held until the job returns)
    except UserError as exc:
        fail(str(exc))
        if not in_sweep:
            sys.exit(2)
        return REFUSED  # the sweep's summary (sweep.SummarizeSweep) names the job and exits non-zero
    resume = shlex.join(["lora", "train", *from_scratch, "resume=auto", f"hydra.run.dir={hydra_quoted(str(run_dir))}"])
    try:
        with terminate_as_interrupt():
            result = _train(cfg, run_dir, command)
    except Interrupted as exc:
        finish("interrupted", f"{exc}; continue with: {resume}", reason=str(exc))
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C outside the loop's steps, which turn it into a checkpoint (Interrupted)
        if complete_checkpoints(run_dir):
            reason = f"interrupted outside a training step; continue from the last checkpoint with: {resume}"
        else:
            reason = "interrupted before anything was trained or saved; run the command again"
        finish("interrupted", reason, reason=reason)
        sys.exit(130)
    except Exception as exc:
        reason = one_line_reason(exc)
        if cfg.get("debug") or not (in_sweep or isinstance(exc, UserError)):
            finish("failed", reason=reason)
            raise
        finish("failed", reason, reason=reason)
        if not in_sweep:
            sys.exit(2)
        return None
    finish("complete", result=result)  # trained: what follows only measures the saved adapter
    if cfg.trainer.eval_at_end and launched.rank() == 0:
        unfinished = evaluate_at_end(run_dir, cfg) if not result["stopped_while_saving"] else (
            f"stopped while the run's files were written (they are complete); the end-of-run evaluation did not "
            f"start: run `lora eval run={run_dir}`", 130)
        if unfinished:  # the run stays complete; its record says the evaluation did not finish
            eval_error, code = unfinished
            finish("complete", eval_error, result=result, eval_error=eval_error)
            if not in_sweep:
                sys.exit(code)
    return None


def reproducing_overrides(task_overrides: list[str], cfg) -> list[str]:
    """What reproduces the run from scratch: an exact resume trains the same adapter, so `resume=` is left out,
    and local paths are absolute. Under `accelerate launch -m lora_cli train ...` by hand, the run records the
    processes it ran on (in cfg too), so that its config, its commands and a resume (which refuses another count)
    all mean the same global batch."""
    from lora_cli import launched

    overrides = [o for o in task_overrides if not o.startswith("resume=")]
    world = launched.world_size()
    if world != cfg.trainer.num_processes:
        cfg.trainer.num_processes = world
        overrides = [*(o for o in overrides if not o.startswith("trainer.num_processes=")),
                     f"trainer.num_processes={world}"]
    return with_absolute_path_overrides(overrides, cfg)


def with_absolute_path_overrides(overrides: list[str], cfg) -> list[str]:
    """The overrides with local paths (data, model folder, launcher file) as config.yaml keeps them, absolute, so
    that the commands a run prints (the card's Reproduce, "continue with") work from any folder: a relative
    dataset.path in the continue command was refused as a config change when pasted elsewhere."""
    from lora_cli.config import to_run_config, with_absolute_paths
    from lora_cli.overrides import hydra_quoted, value_of

    try:
        run = with_absolute_paths(to_run_config(cfg))
    except UserError:  # an invalid config: the job reports it, with the command as typed
        return overrides
    absolute = {"dataset.path": run.dataset.path, "model.name_or_path": run.model.name_or_path,
                "trainer.launcher": run.trainer.launcher}

    def pinned(override: str) -> str:
        key = override.partition("=")[0]
        path = absolute.get(key.lstrip("+"))
        moved = path is not None and "=" in override and path != value_of(override)
        return f"{key}={hydra_quoted(path)}" if moved else override

    return [pinned(o) for o in overrides]


def evaluate_at_end(run_dir: Path, cfg) -> tuple[str, int] | None:
    """trainer.eval_at_end: `lora eval` on the adapter just saved. A stop or a failure here takes nothing from the
    trained run: it returns what to record (until `lora eval` writes eval.json) and the exit code."""
    from lora_cli.config import to_run_config, with_absolute_paths
    from lora_cli.evaluate import evaluate_run

    try:
        with terminate_as_interrupt():
            evaluate_run(run_dir, with_absolute_paths(to_run_config(cfg)))
    except KeyboardInterrupt:
        return f"the end-of-run evaluation was interrupted; the adapter is saved: run `lora eval run={run_dir}`", 130
    except Exception as exc:
        if cfg.get("debug"):
            raise
        return (f"the end-of-run evaluation failed ({one_line_reason(exc)}); the adapter is saved: fix that and run "
                f"`lora eval run={run_dir}`"), 2
    return None


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) ends the job as Ctrl-C does, so that run.json records it. Within the
    training steps the loop's own handler takes both signals and checkpoints first (train.StopRequest)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line_reason(exc: BaseException) -> str:
    """An exception as the one line that run.json and the terminal give as the reason."""
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"


def _train(cfg, run_dir: Path, command: str) -> dict:
    from lora_cli.config import to_run_config, with_absolute_paths
    from lora_cli.train import train

    result, _ = train(with_absolute_paths(to_run_config(cfg)), run_dir, command)
    return result


def run_report(args: list[str]) -> int:
    """`lora report DIR [metric=NAME]`: summary.csv, summary.png and a leaderboard for the runs under DIR."""
    named, rest = take_named(args, ("metric",))
    check_names("report", [a for a in rest if not Path(a).expanduser().exists()], ("metric",), takes_keys=False)
    if len(rest) != 1:
        raise UserError("usage: lora report SWEEP_DIR [metric=eval_loss|accuracy|token_f1|tokens_per_s|...]")
    from lora_cli.report import quiet_libraries
    from lora_cli.sweep import summarize

    quiet_libraries()
    summarize(Path(rest[0]).expanduser(), named.get("metric", "eval_loss"))
    return 0


def take_named(args: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split `name=value` command arguments (values may contain '=') from config overrides."""
    named, rest = {}, []
    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and name in names:
            named[name] = value
        else:
            rest.append(arg)
    return named, rest


def check_names(command: str, rest: list[str], names: tuple[str, ...], takes_keys: bool) -> None:
    """A `name=value` that is neither the command's own argument nor (where it takes overrides) a config key is
    most likely a misspelt one (promt=hi), which would otherwise be reported as an unknown config key."""
    from dataclasses import fields

    from lora_cli.config import RunConfig

    top = {item.name for item in fields(RunConfig)} if takes_keys else set()
    for arg in rest:
        name, sep, _ = arg.partition("=")
        if sep and "." not in name and name.lstrip("+~") not in top:
            hint = did_you_mean(name, [*names, *sorted(top)], "{}=")
            raise UserError(f"lora {command} takes no {name}=; {hint}`lora {command} --help` lists what it takes")


def run_on_finished_run(command: str, args: list[str]) -> int:
    """`lora eval|generate|merge run=RUN_DIR ...`: the run's config plus overrides, then the command."""
    named, rest = take_named(args, NAMED_ARGS[command])
    rest = [a for a in rest if a.partition("=")[0] != "debug"]  # main()'s to read; not a setting eval.json records
    check_names(command, rest, NAMED_ARGS[command], takes_keys=True)
    missing = [name for name in REQUIRED_ARGS[command] if not named.get(name)]
    if missing:
        usage = " ".join(f"{name}=..." for name in REQUIRED_ARGS[command])
        raise UserError(f"lora {command} needs {', '.join(missing)}=; usage: lora {command} {usage} [KEY=VALUE ...]")
    run_dir = Path(os.path.abspath(Path(named["run"]).expanduser()))  # as provenance and eval.json record it
    if not run_dir.is_dir():
        raise UserError(f"run={run_dir}: no such directory; pass the run dir that `lora train` wrote")
    # `adapter=false` reads naturally on the generate command line; it is generate.adapter.
    rest = [f"generate.{a}" if command == "generate" and a.split("=")[0] == "adapter" else a for a in rest]

    from lora_cli.report import quiet_libraries
    from lora_cli.runs import load_run_config

    quiet_libraries()
    cfg = load_run_config(run_dir, rest, command)
    if command == "eval":
        from lora_cli.evaluate import evaluate_run

        evaluate_run(run_dir, cfg, rest)
    elif command == "generate":
        from lora_cli.generate import generate

        given = any(a.split("=")[0].lstrip("+~") == "dataset.system_prompt" for a in rest)
        generate(run_dir, cfg, named.get("prompt"), system_prompt_given=given)
    else:
        from lora_cli.merge import merge_run

        output = Path(os.path.abspath(Path(named["output"]).expanduser()))  # staged beside it: `.` has no parent
        merge_run(run_dir, output, cfg, shlex.join(["lora", command, *args]))
    return 0
