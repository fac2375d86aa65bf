"""A training run's directory: its files, creating it, checking it, and cleaning up after a failed run.

``mmf train`` writes one directory per run (default ``runs/<name>-<YYYYmmdd-HHMMSS>``)::

    train_config.toml     the resolved config (``--resume`` reads it back)
    metrics.jsonl         one JSON line per logged step and per validation
    loss_curve.png        training and validation loss against tokens seen
    step-NNNNNNN/         a checkpoint (``mmf.train_checkpoint``); the last ``checkpoint.keep`` are kept

A checkpoint counts only once its ``trainer_state.json`` exists (it is written inside an atomic
directory, so a half-written one is never listed); what else it holds is ``mmf.train_checkpoint``'s.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import MMFError
from .train_config import TrainConfig, load_train_config
from .units import human_bytes

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks one complete
OPTIM_FILE = "optimizer.safetensors"  # a checkpoint's optimiser state (``mmf.train_checkpoint``)
RNG_FILE = "rng.safetensors"  # and its random-number generators' states
TRAINING_STATE_FILES = (STATE_FILE, OPTIM_FILE, RNG_FILE)  # what --resume needs beside the model
RUN_CONFIG = "train_config.toml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


def checkpoint_dir(out: Path, step: int) -> Path:
    """``out/step-NNNNNNN``: where the checkpoint after ``step`` optimiser steps is written."""
    return out / f"{CKPT_PREFIX}{step:07d}"


def make_run_dir(cfg: TrainConfig, clock: Callable[[], float] = time.time) -> Path:
    """Create and return ``runs/<name>-<YYYYmmdd-HHMMSS>``; ``-2``, ``-3``, ... when it exists already.

    Created with ``os.mkdir`` (never ``exist_ok``), so two runs started in the same second, in one
    process or two, never share a directory: the one that loses the race takes the next suffix.
    """
    stem = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(clock()))}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        out = stem if n == 1 else Path(f"{stem}-{n}")
        try:
            os.mkdir(out)
            return out
        except FileExistsError:
            n += 1
        except OSError as e:
            raise MMFError(f"cannot create run directory {out} ({e.strerror}); choose a writable --out") from None


def _fresh(out: Path) -> bool:
    """True if ``out`` is absent, empty, or holds only what a run that failed before training leaves."""
    return not out.exists() or all(p.name == RUN_CONFIG for p in out.iterdir())


def run_of_checkpoint(path: Path) -> Optional[Path]:
    """The run directory whose checkpoint ``path`` is or would be (``RUN/step-NNNNNNN`` holding
    ``trainer_state.json``, or any ``step-NNNNNNN`` in a directory with ``train_config.toml``), or None."""
    path = Path(path)
    if path.name.startswith(CKPT_PREFIX) and path.name[len(CKPT_PREFIX):].isdigit() \
            and ((path / STATE_FILE).is_file() or (path.parent / RUN_CONFIG).is_file()):
        return path.parent
    return None


def check_not_a_checkpoint(out: Path) -> None:
    """``--out RUN/step-NNNNNNN`` names a checkpoint, not a run: say to pass the run (or a new --out)."""
    run = run_of_checkpoint(out)
    if run is not None:
        raise MMFError(f"--out {out} names a checkpoint of the run {run}, not a run directory; to continue that run "
                       f"pass --resume --out {run}, or choose a new --out for a new run")


def check_resume_has_out(out: Optional[Path], resume: bool) -> None:
    """``--resume`` continues the run in ``--out``: without one there is nothing to continue."""
    if resume and out is None:
        raise MMFError("--resume needs --out RUN_DIR (the directory of the run to continue)")


def is_run_dir(path: Path) -> bool:
    """A training run's directory: its ``train_config.toml`` beside at least one ``step-NNNNNNN`` directory."""
    return (path / RUN_CONFIG).is_file() and any(p.name.startswith(CKPT_PREFIX) and p.is_dir() for p in path.iterdir())


def check_out_dir(out: Path, resume: bool) -> None:
    """One clear line for an ``--out`` that cannot be a run directory."""
    check_not_a_checkpoint(out)
    if out.exists() and not out.is_dir():
        raise MMFError(f"--out {out} is a file, not a directory; give a directory path for the run "
                       "(it is created if absent)")
    if not resume and not _fresh(out):
        raise MMFError(f"{out} already exists and is not empty; pass --resume to continue it or choose another --out")


def discard_failed_run(out: Path, created: bool) -> None:
    """After a run that failed or stopped before its first checkpoint: remove what it wrote.

    Only the files a run writes are removed (the run config, metrics, the plot, a write probe); the
    directory goes too if this run created it and it is then empty. A directory with a checkpoint,
    or with files of the user's, is left as it is.
    """
    if not out.is_dir() or list_checkpoints(out):
        return
    for p in out.iterdir():
        if p.is_file() and (p.name in (RUN_CONFIG, METRICS_FILE, PLOT_FILE) or p.name.startswith(".write-test-")):
            p.unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass  # something else is in it: keep it


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / STATE_FILE).exists():
            try:
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def preflight(out: Path, n_params: int, keep: int, steps: int, every: int) -> None:
    """Fail before training if ``out`` cannot be written or the disk cannot hold the checkpoints: the last
    ``keep`` of those a run of ``steps`` writes (every ``every`` steps and at the end), plus one being written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise MMFError(f"cannot write to output directory {out} ({e.strerror}); choose another --out") from None
    per_ckpt = n_params * 4 * 3 + (1 << 20)  # fp32 weights + two AdamW moments
    n = min(keep, math.ceil(steps / every)) + 1
    need = per_ckpt * n
    free = shutil.disk_usage(out).free
    if free < need:
        raise MMFError(f"{out}: only {human_bytes(free)} free but {n} checkpoints need about "
                       f"{human_bytes(need)}; free space, lower checkpoint.keep or choose another --out")


def resume_config(out: Path, overrides: Optional[list] = None, given: str = "--set") -> TrainConfig:
    """The config saved in a run directory, with ``--set`` overrides (e.g. more steps); ``given`` as for
    ``load_train_config``."""
    out = Path(out)
    check_not_a_checkpoint(out)
    if not (out / RUN_CONFIG).exists():
        raise MMFError(f"{out}: not a training run directory (no {RUN_CONFIG}); give the --out of the run to resume")
    return load_train_config(str(out / RUN_CONFIG), overrides, given=given)
