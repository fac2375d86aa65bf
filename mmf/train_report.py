"""What a training run shows and records as it goes: rank 0's progress bar or plain lines on the
console, one JSON line per logged step and per validation in ``metrics.jsonl``, and at the end the loss
curve (``loss_curve.png``) drawn from those lines.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

from .distributed import World
from .errors import MMFError
from .run_dir import METRICS_FILE, list_checkpoints
from .units import plural


class Reporter:
    """Rank 0's progress bar (or plain lines when not on a terminal) and metrics.jsonl."""

    def __init__(self, world: World, out: Path, total: int, start: int, progress: bool, log: Callable):
        self.on = world.is_main
        self.log = log
        self.metrics = out / METRICS_FILE
        self.bar = None
        if not self.on:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if progress and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s{task.fields[over]}"
                           "  lr {task.fields[lr]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", over="")
            self.bar.start()
        self.plain = progress and self.bar is None

    def write(self, record: dict) -> None:
        """Append one line to metrics.jsonl; if it cannot be written whole (a full disk), what was written of
        it is cut off again and the run stops in one line naming the last good checkpoint."""
        if not self.on:
            return
        data = memoryview((json.dumps(record) + "\n").encode())
        try:
            fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # mode 0666 & ~umask
        except OSError as e:
            raise self._write_error(e) from None
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError as e:
                try:
                    os.ftruncate(fd, size)  # no partial record left behind
                except OSError:
                    pass
                raise self._write_error(e) from None
        finally:
            os.close(fd)

    def _write_error(self, e: OSError) -> MMFError:
        kept = list_checkpoints(self.metrics.parent)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        return MMFError(f"could not write {self.metrics} ({e.strerror or e}); {where}. Free space, then "
                        f"{'mmf train --resume --out ' + str(self.metrics.parent) if kept else 'run it again'}")

    def step(self, step: int, total: int, eta: float, record: Optional[dict]) -> None:
        """Progress after ``step``; ``record`` is the metrics.jsonl line just written, if any: the console
        shows its figures, so the two agree (loss and tok/s over the steps since the previous record)."""
        if not self.on:
            return
        if self.bar is not None:
            fields = {}
            if record is not None:
                fields = dict(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                              tps=f"{record['tokens_per_s']:,.0f}",
                              over=f" (means over {plural(record['steps_averaged'], 'step')})")
            self.bar.update(self.task, completed=step, **fields)
        elif self.plain and record is not None:
            self.log(f"step {step}/{total}  loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s "
                     f"(means over {plural(record['steps_averaged'], 'step')})  lr {record['lr']:.2e}  "
                     f"ETA {eta:,.0f} s")

    def message(self, text: str) -> None:
        if self.on:
            if self.bar is not None:
                self.bar.console.print(text)
            else:
                self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def plot_metrics(metrics: Path, png: Path, unigram: float) -> None:
    """Training and validation loss against tokens seen, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for r in read_metrics(metrics):
        if "val_loss" in r:
            val.append((r["tokens"], r["val_loss"]))
        elif "loss" in r:
            train.append((r["tokens"], r["loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    if math.isfinite(unigram):
        ax.axhline(unigram, color="grey", ls="--", lw=1, label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(metrics.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def _record(line: str) -> Optional[dict]:
    """A metrics.jsonl line as a record; None for one that is not (cut short by a crash or a full disk)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


def read_metrics(metrics: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, without the lines that are not whole records."""
    return [r for line in metrics.read_text().splitlines() if (r := _record(line)) is not None]


def drop_metrics_after(metrics: Path, step: int) -> None:
    """On ``--resume``: remove the records of ``metrics.jsonl`` past the checkpoint's ``step``, and any line
    that is not a whole record (a crash mid-write), rewriting it atomically (a temporary name, then a rename)."""
    if metrics.exists():
        lines = [l for l in metrics.read_text().splitlines()
                 if (r := _record(l)) is not None and r.get("step", 0) <= step]
        tmp = metrics.with_name(f".{metrics.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text("".join(l + "\n" for l in lines))
            os.replace(tmp, metrics)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MMFError(f"could not rewrite {metrics} ({e.strerror or e}); it is unchanged: free space "
                           "and --resume again") from None
