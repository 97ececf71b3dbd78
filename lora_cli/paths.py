"""Where shipped files and the user cache live, in a checkout and in an installed wheel alike."""

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """`configs/`, `recipes/`, `launchers/`: inside the package in a wheel, at the top of the repo in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lora-cli is installed without its {name}/ folder; reinstall the package")


def cache_dir() -> Path:
    """$LORA_CLI_CACHE, else $XDG_CACHE_HOME/lora-cli, else ~/.cache/lora-cli."""
    if os.environ.get("LORA_CLI_CACHE"):  # absolute: adapters record the cached base's path, to load from anywhere
        return Path(os.environ["LORA_CLI_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser().resolve() / "lora-cli"


def staging_dir(target: Path) -> Path:
    """An empty temp folder beside `target`, on the same file system so `publish` is an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def publish(staging: Path, target: Path) -> None:
    """Give a finished staging folder normal permissions (mkdtemp and safetensors make them private) and
    rename it into place, replacing whatever `target` held. The old content is moved aside before and deleted
    after, so a process killed in between leaves it whole beside the target (`.NAME.old-*`), never half-deleted."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
        os.rename(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old.parent)


def write_atomic(path: Path, text: str) -> None:
    """Replace a file whole (written aside, then renamed), so that a reader, or a run stopped midway, never sees
    half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


@contextmanager
def full_disk_as_error(what: str, then: str):
    """Running out of disk space while writing `what` as one line saying what to do: safetensors reports it as
    its own error type (SafetensorError, "os error 28"), not as an OSError."""
    from lora_cli.errors import UserError

    try:
        yield
    except Exception as exc:
        if getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc) or "No space left" in str(exc):
            raise UserError(f"out of disk space while writing {what}; {then}") from None
        raise


@contextmanager
def locked(lock_file: Path):
    """An exclusive advisory lock held for the block (released if the process dies)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
