"""Several processes: `trainer.num_processes=N` re-runs the same `lora train` command under `accelerate launch`
(torchrun underneath), one process per GPU, or N CPU processes with the gloo backend. The loop inside is
the same; only the main process (rank 0) prints and writes files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def world_size() -> int:
    """Processes in this run, as set by torchrun / accelerate launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    """A free local port for the processes to meet on, so parallel launches do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], num_processes: int, run_dir: str) -> int:
    """Run `lora train ARGS` on `num_processes` processes and return their exit code.

    `--multi_gpu` is accelerate's flag for torchrun-style launching: on a CPU-only machine it starts the N
    processes with the gloo backend (its `--cpu` flag with a MULTI_CPU config would silently start one).
    `--quiet` keeps torchrun's own stack traces out of the way of our one-line errors."""
    args = [a for a in args if not a.startswith("hydra.run.dir=")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "--quiet", "-m", "lora_cli", "train", *args,
               f"hydra.run.dir={run_dir}"]
    return subprocess.call(command)
