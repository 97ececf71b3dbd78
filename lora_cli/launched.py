"""Several processes: `trainer.num_processes=N` re-runs the same `lora train` command under `accelerate launch`
(torchrun underneath), one process per GPU, or N CPU processes with the gloo backend. The loop inside is
the same; only the main process (rank 0) prints and writes files.

`trainer.launcher=NAME` launches with one of the accelerate config files in launchers/ (DDP, FSDP, DeepSpeed
ZeRO-2/3) or the user's own; `accelerate launch --config_file FILE -m lora_cli train ...` run by hand does the
same. What this loop does not do under FSDP / DeepSpeed is refused before any process starts."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

from lora_cli.config import LAUNCHERS, RunConfig, TrainerConfig
from lora_cli.errors import UserError
from lora_cli.overrides import hydra_quoted

# accelerate's distributed_type values under which the loop hands parameters or the step to a framework.
SHARDING_TYPES = ("FSDP", "DEEPSPEED")
MULTI_MACHINE_PORT = 29500  # torchrun's default; every machine must use the same one
STOP_GRACE_SECONDS = 600  # after a stop, how long the workers may take to finish their step and checkpoint
# Set by `launch` for the launcher it starts, and so for the workers the launcher starts: each asks to die with its
# parent (`die_with_parent`). torchrun starts every worker in a session of its own, so nothing else ends them when
# `lora` is killed (SIGKILL, or a second Ctrl-C): they trained on, unwatched, holding the run dir.
DIE_WITH_PARENT = "LORA_CLI_DIE_WITH_PARENT"


def world_size() -> int:
    """Processes in this run, as set by torchrun / accelerate launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_on_this_machine() -> int:
    """This machine's share of them (torchrun's LOCAL_WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    """A free local port for the processes to meet on, so parallel launches do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_file(launcher: str) -> Path:
    """The accelerate config file of `trainer.launcher`: a shipped one by name, else the user's path."""
    from lora_cli.paths import shipped_dir

    if launcher in LAUNCHERS:
        return shipped_dir("launchers") / f"{launcher}.yaml"
    return Path(launcher).expanduser()


def distributed_type(config_file: Path) -> str:
    """The file's `distributed_type` (MULTI_GPU, FSDP, DEEPSPEED, ...), as accelerate reads it."""
    import yaml

    try:
        found = (yaml.safe_load(config_file.read_text()) or {}).get("distributed_type")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise UserError(f"trainer.launcher={config_file} is not a readable accelerate config file "
                        f"({type(exc).__name__}); write one with `accelerate config --config_file FILE`") from None
    if not isinstance(found, str):
        raise UserError(f"trainer.launcher={config_file} names no distributed_type; it must be an accelerate "
                        "config file (`accelerate config --config_file FILE` writes one)")
    return found


def check_gpus(processes_here: int, setting: str) -> None:
    """On CUDA each process takes a GPU of its own: NCCL refuses two on one device, and only inside DDP's set-up,
    with a traceback from every process. `setting` names what asked for the processes, for the message."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and processes_here > gpus:
        raise UserError(f"{setting} starts {processes_here} processes on this machine, one per GPU, and it has "
                        f"{gpus} GPU{'s' if gpus > 1 else ''}; start at most {gpus} per machine, or hide the GPUs "
                        "(CUDA_VISIBLE_DEVICES=) to train that many processes on the CPU")


def check_launcher(run: RunConfig) -> None:
    """Before launching: the launcher file exists, this machine can run it, the loop supports it, and each process
    has a GPU of its own."""
    trainer = run.trainer
    if trainer.launcher is not None:
        check_launcher_file(run)
    if world_size() > 1:  # `accelerate launch` by hand: what it started on this machine, whatever the config says
        check_gpus(processes_on_this_machine(), "this launch")
    else:
        check_gpus(trainer.num_processes // trainer.num_machines, f"trainer.num_processes={trainer.num_processes}")


def check_launcher_file(run: RunConfig) -> None:
    launcher = run.trainer.launcher
    path = launcher_file(launcher)
    if not path.is_file():
        raise UserError(f"trainer.launcher={launcher}: no such file; pass one of {', '.join(LAUNCHERS)} or the "
                        "path of an accelerate config file")
    kind = distributed_type(path)
    if kind in SHARDING_TYPES:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.launcher={launcher} ({kind}) needs CUDA GPUs and this machine has none; on "
                            "CPU leave trainer.launcher unset (or use ddp): gloo DDP with trainer.num_processes=N")
        if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"trainer.launcher={launcher} needs the deepspeed package, which is not installed; run "
                            "`pip install deepspeed`")
    check_supported(run, kind)


def check_supported(run: RunConfig, kind: str) -> None:
    """What the loop does not do under FSDP / DeepSpeed (`kind` is accelerate's distributed_type). Called before
    launching and again inside `train`, which also covers `accelerate launch` run by hand.

    Each process holds only a shard of the optimizer state there, and the variants' hooks read whole gradients
    and optimizer moments; DeepSpeed's engine also takes the step inside backward, before the loop could
    accumulate micro-batches or skip a step."""
    if kind not in SHARDING_TYPES:
        return
    under = f"under {kind} (trainer.launcher={run.trainer.launcher or 'an accelerate config file'})"
    if run.adapter.name not in ("lora", "qlora"):
        raise UserError(f"adapter={run.adapter.name} is not supported {under}; use adapter=lora or adapter=qlora, or "
                        "leave trainer.launcher unset (DDP)")
    if run.trainer.compile:
        raise UserError(f"trainer.compile=true is not supported {under}; set trainer.compile=false")
    if run.trainer.save_every is not None or run.resume is not None:
        raise UserError(f"checkpoints (trainer.save_every, resume) are not supported {under}: each process holds "
                        "only a shard of the optimizer state; set trainer.save_every=null and drop resume")
    if run.adapter.quantize is not None and not (run.model.dtype == "bfloat16" and run.trainer.precision == "bf16"):
        raise UserError(f"a 4-bit base {under} needs model.dtype=bfloat16 and trainer.precision=bf16: the 4-bit "
                        "weights are stored in model.dtype so that they shard with the rest, and must not be cast")
    if kind == "DEEPSPEED" and run.trainer.grad_accum != 1:
        raise UserError(f"trainer.grad_accum={run.trainer.grad_accum} is not supported {under}: its engine steps "
                        "after every backward; set trainer.grad_accum=1 and raise trainer.batch_size instead")
    if kind == "DEEPSPEED" and run.trainer.on_nonfinite != "stop":
        raise UserError(f"trainer.on_nonfinite={run.trainer.on_nonfinite} is not supported {under}: its engine "
                        "has taken the step before the loop sees the gradients; set trainer.on_nonfinite=stop")


def shards_parameters(accelerator) -> bool:
    """FSDP and DeepSpeed ZeRO-3 split every parameter over the processes: none holds a whole tensor."""
    kind = accelerator.distributed_type.value
    return kind == "FSDP" or (kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3)


def launch_command(args: list[str], trainer: TrainerConfig, run_dir: str) -> list[str]:
    """The `accelerate launch` command that runs `lora train ARGS` on `trainer.num_processes` processes.

    Without a launcher file, `--multi_gpu` is accelerate's flag for torchrun-style launching: on a CPU-only
    machine it starts the N processes with the gloo backend (its `--cpu` flag with a MULTI_CPU config would
    silently start one). With one, `--config_file` says it all; the trainer.* launch keys given here win over
    the file's. `run_launcher` runs it, so that a failure ends with the workers' own one-line error and exit
    code, not torchrun's traceback."""
    args = [a for a in args if not a.startswith("hydra.run.dir=")]
    if trainer.launcher is None:
        how = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        how = ["--config_file", str(launcher_file(trainer.launcher))]
    port = trainer.main_process_port or (free_port() if trainer.num_machines == 1 else MULTI_MACHINE_PORT)
    where = ["--num_processes", str(trainer.num_processes), "--num_machines", str(trainer.num_machines)]
    if trainer.num_machines > 1:
        where += ["--machine_rank", str(trainer.machine_rank), "--main_process_ip", str(trainer.main_process_ip)]
    return [sys.executable, "-m", "lora_cli.launched", *how, *where, "--main_process_port", str(port),
            "--quiet", "-m", "lora_cli", "train", *args, f"hydra.run.dir={hydra_quoted(str(run_dir))}"]


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that started it ends (Linux's PR_SET_PDEATHSIG;
    elsewhere nothing). A parent that is gone already (this process adopted by init) ends it now."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def launch(args: list[str], trainer: TrainerConfig, run_dir: str) -> int:
    """Run `lora train ARGS` on `trainer.num_processes` processes and return their exit code.

    The launcher runs in a session of its own, so that a stop reaches the workers once, through it: Ctrl-C,
    SIGTERM or a closed terminal here is passed on, torchrun hands it to every worker, and they checkpoint at
    the end of their step and exit; this process waits for that. A second stop kills them all at once, and so
    does this process's own end, however it comes (DIE_WITH_PARENT)."""
    import signal

    process = subprocess.Popen(launch_command(args, trainer, run_dir), start_new_session=True,
                               env={**os.environ, DIE_WITH_PARENT: "1"}, preexec_fn=die_with_parent)
    stops = []

    def forward(signum, frame):
        stops.append(signum)
        if len(stops) == 1:
            process.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        else:
            os.killpg(process.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code >= 0:
        return code
    return 130 if stops else 128 - code  # killed by a signal: the shell's code for it (130 for a Ctrl-C), not 247


def run_launcher(argv: list[str]) -> int:
    """`accelerate launch ARGV`, in this process, with the workers' outcome as the exit code. A worker's error has
    been printed by the main process in one line; torchrun would follow it with a ChildFailedError traceback and
    exit 1. Here the launch ends with the first failed worker's own exit code (2 for a user error), and with 130
    when a stop signal ended it (the workers have checkpointed and said how to continue)."""
    import logging

    import torch.distributed.run  # noqa: F401 - creates torchrun's loggers, quieted below
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Its warnings ("Sending process N closing signal SIGTERM", "failed (exitcode: 2)") would follow the workers'
    # one-line error; what they say is in the exit code, or below.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # The workers have until then to finish their step and write a checkpoint (torchrun's default: 30 s).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_SECONDS))
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        signal_name = failure.signal_name()  # killed from outside, so it printed nothing: say what happened
        sys.stderr.write(f"lora: error: process {rank} was killed by {signal_name}"
                         f"{' (out of memory?)' if signal_name == 'SIGKILL' else ''}; the run is incomplete\n")
        return 128 - failure.exitcode
    except SignalException:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(sys.argv[1:]))
