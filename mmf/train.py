"""Training loop: one process, or many under torchrun (DDP or FSDP), for both architectures.

Read top to bottom: ``train`` prepares the output directory (checked for space and write access
before anything else), the token cache, the model and the optimiser, then runs the loop. Every
``checkpoint.every`` steps, at the end, on Ctrl-C and on ``stop_after`` it writes
``OUT/step-NNNNNNN/``, atomically, keeping the last ``checkpoint.keep``. A checkpoint directory is
a normal model checkpoint (``config.json``, ``model.safetensors``, the tokenizer) that
``mmf generate`` and ``mmf.load_model`` read, plus the training state, without pickle:

* ``optimizer.safetensors``: AdamW moments and step counts, keyed ``state.<param>.<name>``;
* ``trainer_state.json``: step, samples and tokens seen (the data position), optimiser param
  groups, the run's metrics so far; ``rng.safetensors``: the torch RNG states.

The data order is a pure function of the global sample index (``mmf.data``), the learning rate a
pure function of the step, so ``--resume`` continues bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import __version__
from .checkpoint import CONFIG_FILE, atomic_directory, write_safetensors_sharded
from .data import (BUILTIN_PREFIX, TokenData, batch_indices, builtin_corpus_file, load_saved_tokenizer,
                   prepare_tokens, resolve_files)
from .distributed import World, all_mean, all_sum, any_flag, barrier, broadcast_object, init_world, shutdown
from .errors import MMFError
from .units import human_bytes
from .train_config import TrainConfig, build_model_config, config_to_toml, load_train_config

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
RUN_CONFIG = "train_config.toml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


@dataclass
class TrainResult:
    out: Path
    checkpoint: Optional[Path]
    step: int
    losses: list = field(default_factory=list)  # this process's per-step training losses (global mean)
    val_loss: float = float("nan")  # the last validation of this run; nan if none ran (interrupted early)
    val_step: int = 0  # the step at which val_loss was measured
    unigram_entropy: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    interrupted: bool = False
    params: int = 0
    is_main: bool = True  # rank 0 (the process that prints and writes)

    def summary(self) -> dict:
        """The run's figures, raw (``mmf train --json``); a validation loss not measured is None."""
        measured = math.isfinite(self.val_loss)
        return {
            "out": str(self.out), "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "steps": self.step, "interrupted": self.interrupted,
            "train_loss_last_step": self.losses[-1] if self.losses else None,
            "val_loss": self.val_loss if measured else None, "val_step": self.val_step if measured else None,
            "val_perplexity": math.exp(min(self.val_loss, 50)) if measured else None,
            "unigram_entropy": self.unigram_entropy if math.isfinite(self.unigram_entropy) else None,
            "tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": self.tokens_per_s,
            "parameters": self.params,
        }


# ---------------------------------------------------------------------------------------------
# Learning rate

def schedule(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """(learning rate, weight decay) at ``step`` (0-based).

    cosine: linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step.
    two_stage (the paper's): the same curve, but from the midpoint on the learning rate is
    multiplied by ``stage2_lr_ratio`` and weight decay becomes ``stage2_weight_decay`` (0).
    constant: warm-up, then ``lr``.
    """
    s, o, total = cfg.schedule, cfg.optim, cfg.train.steps
    peak, wd = o.lr, o.weight_decay
    if step < s.warmup_steps:
        lr = peak * (step + 1) / s.warmup_steps
    elif s.type == "constant":
        lr = peak
    else:
        span = max(1, total - 1 - s.warmup_steps)
        p = min(1.0, (step - s.warmup_steps) / span)
        floor = peak * s.min_lr_ratio
        lr = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if s.type == "two_stage" and step >= total // 2:
        lr *= s.stage2_lr_ratio
        wd = s.stage2_weight_decay
    return lr, wd


# ---------------------------------------------------------------------------------------------
# Output directory and checkpoints

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


def _check_out(out: Path, resume: bool) -> None:
    """One clear line for an ``--out`` that cannot be a run directory."""
    if out.exists() and not out.is_dir():
        raise MMFError(f"--out {out} is a file, not a directory; give a directory path for the run "
                       "(it is created if absent)")
    if not resume and not _fresh(out):
        raise MMFError(f"{out} already exists and is not empty; pass --resume to continue it or choose another --out")


def _discard_failed_run(out: Path, created: bool) -> None:
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


def preflight(out: Path, n_params: int, keep: int) -> None:
    """Fail before training if ``out`` cannot be written or the disk cannot hold the checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise MMFError(f"cannot write to output directory {out} ({e.strerror}); choose another --out") from None
    per_ckpt = n_params * 4 * 3 + (1 << 20)  # fp32 weights + two AdamW moments
    need = per_ckpt * (keep + 1)
    free = shutil.disk_usage(out).free
    if free < need:
        raise MMFError(f"{out}: only {human_bytes(free)} free but {keep + 1} checkpoints need about "
                       f"{human_bytes(need)}; free space, lower checkpoint.keep or choose another --out")


def _planned_model(cfg: TrainConfig):
    """The model config and parameter count a run will build, before its tokenizer exists: the
    vocabulary is the one asked for, else the tokenizer's (byte: 259, bpe: its vocab_size), else the preset's."""
    from .models import build_model
    from .tokenizer import ByteTokenizer

    vocab = cfg.model.get("vocab_size")
    if not isinstance(vocab, int):
        vocab = {"byte": ByteTokenizer.vocab_size, "bpe": cfg.tokenizer.vocab_size}.get(cfg.tokenizer.type)
    mcfg = build_model_config(cfg.model, vocab_size=vocab)
    if mcfg.arch == "transformer++":
        mcfg.max_position_embeddings = max(mcfg.max_position_embeddings, cfg.train.seq_len)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(mcfg).parameters())
    return mcfg, n


def check_training_memory(world: World, cfg: TrainConfig, log: Callable = print) -> None:
    """Refuse, with the fix, a run whose step would not fit in memory; warn when a GPU-sized model
    trains on the CPU, with the estimated time. The estimate is ``mmf.memory.training_memory``'s."""
    from .memory import (GPU_SIZED_PARAMS, available_bytes, human_seconds, local_processes, training_memory,
                         training_seconds)

    if os.environ.get("MMF_MEMORY_CHECK", "1") == "0":
        return
    T, B, A, W = cfg.train.seq_len, cfg.train.batch_size, cfg.train.grad_accum, world.size
    micro = B // (W * A)
    mcfg, n_params = _planned_model(cfg)
    dev = world.device.type
    use_bf16 = cfg.precision.dtype == "bf16" or (cfg.precision.dtype == "auto" and dev == "cuda")
    procs = local_processes() if dev == "cpu" else 1

    def estimate(micro_batch: int, seq_len: int):
        return training_memory(mcfg, n_params, micro_batch, seq_len, dev, fp32_on_cuda=not use_bf16,
                               world_size=W, strategy=cfg.distributed.strategy, processes=procs)

    est = estimate(micro, T)
    where = "this CPU" if dev == "cpu" else f"GPU {world.device}"
    if dev == "cpu" and n_params >= GPU_SIZED_PARAMS and world.is_main:
        secs = training_seconds(mcfg, n_params, T, cfg.train.steps * B * T) / W
        log(f"warning: {n_params / 1e6:,.0f}M parameters is a GPU-sized model; on {where} "
            f"{cfg.train.steps:,} steps x {B * T:,} tokens would take about {human_seconds(secs)} "
            "(an estimate from this CPU's measured matrix-product rate)")
    avail = available_bytes(world.device)
    if not any_flag(world, est.total > avail):
        return
    need = human_bytes(est.total)
    parts = (f"weights, gradients and AdamW state {human_bytes(est.state * est.processes)}, activations of "
             f"{micro} x {T} tokens per micro-step {human_bytes(est.activations * est.processes)}")
    fixes = []
    # the fewest micro-steps (a larger grad_accum, same train.batch_size) whose micro-batch fits
    fit_k = next((k for k in range(A, B // W + 1) if B % (W * k) == 0 and estimate(B // (W * k), T).total <= avail),
                 None)
    if fit_k is not None:
        fixes.append(f"split each step into more micro-steps with --set train.grad_accum={fit_k} "
                     f"({B // (W * fit_k)} sequences each, same train.batch_size {B})")
    else:
        seq = T
        while seq > 16 and estimate(1, seq).total > avail:
            seq //= 2
        if estimate(1, seq).total <= avail and seq >= 16:
            fixes.append(f"use one sequence per micro-step and shorter sequences: --set train.grad_accum={B // W} "
                         f"--set train.seq_len={seq}")
    fixes.append("train a smaller model (e.g. --config tiny)" if n_params >= GPU_SIZED_PARAMS
                 else "train a smaller model")
    if dev == "cpu":
        fixes.append("train on a GPU")
    raise MMFError(f"training needs about {need} of memory ({parts}) but {human_bytes(avail)} is available on "
                   f"{where}; {'; or '.join(fixes)} (MMF_MEMORY_CHECK=0 skips this check)")


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{fqn}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{fqn}.{k}"] = v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, t in tensors.items():
        fqn, k = key[len("state."):].rsplit(".", 1)
        state.setdefault(fqn, {})[k] = t
    for key, v in meta.get("scalars", {}).items():
        fqn, k = key.rsplit(".", 1)
        state.setdefault(fqn, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(world: World, base, optimizer, mcfg, tokenizer, out: Path, step: int,
                             state: dict, run_config: str, keep: int) -> Optional[Path]:
    """Gather full state on every rank; rank 0 writes ``out/step-NNNNNNN`` atomically and prunes old ones."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(base, options=opts)
    osd = get_optimizer_state_dict(base, optimizer, options=opts)
    path = out / f"{CKPT_PREFIX}{step:07d}"
    if world.is_main:
        msd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in msd.items()}
        if mcfg.tie_word_embeddings:
            msd.pop("lm_head.weight", None)
        otensors, ometa = _flatten_optimizer(osd)
        rng = {"torch_cpu": torch.get_rng_state()}
        if world.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(world.device)
        hf = mcfg.to_hf_dict()
        hf.update(torch_dtype="float32", mmf_version=__version__)
        from safetensors.torch import save_file

        try:
            with atomic_directory(path, overwrite=True) as tmp:
                write_safetensors_sharded(msd, tmp)
                (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
                tokenizer.save(tmp)
                save_file(otensors, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
                save_file(rng, str(tmp / RNG_FILE), metadata={"format": "pt"})
                (tmp / RUN_CONFIG).write_text(run_config)
                (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": ometa}, indent=2) + "\n")
        except OSError as e:  # a full disk or a vanished directory: the earlier checkpoints are untouched
            kept = list_checkpoints(out)
            raise MMFError(f"could not write checkpoint {path} ({e.strerror or e}); "
                           f"{'the last good one is ' + str(kept[-1]) if kept else 'no checkpoint was kept'}") from None
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return path


def load_training_checkpoint(path: Path, base, optimizer) -> dict:
    """Restore model, optimiser and RNG state from ``path`` (every rank reads it)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from .checkpoint import iter_tensors

    state = json.loads((path / STATE_FILE).read_text())
    msd = dict(iter_tensors(path))
    if getattr(base.config, "tie_word_embeddings", False) and "lm_head.weight" not in msd:
        msd["lm_head.weight"] = msd["model.embeddings.weight"]
    set_model_state_dict(base, msd, options=StateDictOptions(full_state_dict=True))
    osd = _unflatten_optimizer(load_file(str(path / OPTIM_FILE)), state["optimizer"])
    # strict=False: a parameter that never had a gradient (layer 0's MLGRU lower bound) has no AdamW state
    set_optimizer_state_dict(base, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
    rng = load_file(str(path / RNG_FILE))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return state


# ---------------------------------------------------------------------------------------------
# Model, optimiser, evaluation

def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases, the MLGRU lower bounds)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("lower_bounds") else no_decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=device.type == "cuda")


def loss_of(model, x: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        logits = model(x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(world: World, model, data: TokenData, max_tokens: int, batch: int, autocast) -> float:
    """Mean validation loss (nats/token) over the first ``max_tokens`` of the validation split."""
    was = model.training
    model.eval()
    windows = data.val_windows(max_tokens)
    mine = windows[world.rank::world.size]
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    n_batches = math.ceil(len(windows) / world.size / batch)  # the same count on every rank (FSDP needs it)
    for i in range(n_batches):
        chunk = mine[i * batch:(i + 1) * batch]
        if len(chunk) == 0:
            chunk = windows[:1]  # keeps collectives aligned; not counted
            count = 0
        else:
            count = chunk.shape[0] * (chunk.shape[1] - 1)
        x = torch.from_numpy(chunk).to(world.device)
        loss = loss_of(model, x, autocast)
        if count:
            total += torch.tensor([loss.item() * count, count], dtype=torch.float64, device=world.device)
    total = all_sum(world, total)
    model.train(was)
    return float(total[0] / total[1])


# ---------------------------------------------------------------------------------------------
# Reporting

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
        if self.on:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

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
                              over=f" (means over {record['steps_averaged']} steps)")
            self.bar.update(self.task, completed=step, **fields)
        elif self.plain and record is not None:
            self.log(f"step {step}/{total}  loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s "
                     f"(means over {record['steps_averaged']} steps)  lr {record['lr']:.2e}  ETA {eta:,.0f} s")

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
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
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


# ---------------------------------------------------------------------------------------------
# The run

class _StopFlag:
    """Ctrl-C sets a flag that the loop reads between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _prepare_data(cfg: TrainConfig, out: Path, world: World, log: Callable) -> tuple[Path, str]:
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out.parent / ".mmf-cache"
    paths = cfg.data.paths
    source = None
    if not paths or (len(paths) == 1 and paths[0] == BUILTIN_PREFIX + "grammar"):
        if world.is_main:
            f, source = builtin_corpus_file(cache_dir, cfg.data.builtin_bytes, cfg.data.builtin_seed)
        barrier(world)
        f, source = builtin_corpus_file(cache_dir, cfg.data.builtin_bytes, cfg.data.builtin_seed)
        files = [f]
        desc = f"embedded grammar corpus ({cfg.data.builtin_bytes:,} bytes, seed {cfg.data.builtin_seed})"
    else:
        files = resolve_files(paths)
        desc = f"{len(files)} file(s) from {', '.join(paths[:3])}"
    tokens_dir = None
    if world.is_main:
        tokens_dir = prepare_tokens(files, cfg.tokenizer, cache_dir, cfg.data.text_field, source, log)
    tokens_dir = Path(broadcast_object(world, str(tokens_dir) if tokens_dir else None))
    return tokens_dir, desc


def train(cfg: TrainConfig, out: Optional[Path] = None, resume: bool = False, log: Callable = print,
          stop_after: Optional[int] = None) -> TrainResult:
    """Train per ``cfg`` into ``out`` (default ``runs/<name>-<time>``); ``resume`` continues ``out``.

    ``stop_after=N`` stops after step N exactly as Ctrl-C would (a checkpoint, then return).
    """
    world = init_world(cfg.precision.device)
    try:
        return _train(world, cfg, out, resume, log if world.is_main else (lambda *a, **k: None), stop_after)
    finally:
        shutdown(world)


def resume_config(out: Path, overrides: Optional[list] = None) -> TrainConfig:
    """The config saved in a run directory, with ``--set`` overrides (e.g. more steps)."""
    out = Path(out)
    if not (out / RUN_CONFIG).exists():
        raise MMFError(f"{out}: not a training run directory (no {RUN_CONFIG}); give the --out of the run to resume")
    return load_train_config(str(out / RUN_CONFIG), overrides)


def _train(world: World, cfg: TrainConfig, out: Optional[Path], resume: bool, log: Callable,
           stop_after: Optional[int]) -> TrainResult:
    t_start = time.time()
    if resume:
        if out is None:
            raise MMFError("--resume needs --out RUN_DIR (the directory of the run to continue)")
        if not list_checkpoints(Path(out)):
            raise MMFError(f"{out}: no checkpoint to resume from (expected {CKPT_PREFIX}NNNNNNN/ with {STATE_FILE})")
    if out is not None:
        _check_out(Path(out), resume)
    B, A = cfg.train.batch_size, cfg.train.grad_accum
    if B % (world.size * A):
        raise MMFError(f"train.batch_size {B} must be a multiple of world size {world.size} x grad_accum {A}")
    # Memory before anything is written or tokenised: a run that cannot fit stops here with the fix.
    check_training_memory(world, cfg, log)
    created = False
    if world.is_main:
        if out is None:
            out, created = make_run_dir(cfg), True
        else:
            created = not Path(out).exists()
    out = Path(broadcast_object(world, str(out)))
    try:
        return _train_in(world, cfg, out, resume, log, stop_after, t_start)
    except BaseException as e:
        if world.is_main and not resume:  # nothing of value (no checkpoint): leave no empty run folder behind
            _discard_failed_run(out, created)
        if isinstance(e, KeyboardInterrupt):  # before the loop (data preparation) or a second Ctrl-C in it
            kept = list_checkpoints(out) if out.is_dir() else []
            log(f"interrupted; the last checkpoint is {kept[-1]}. Continue with: mmf train --resume --out {out}"
                if kept else "interrupted before the first checkpoint; nothing was saved (run the command again)")
        raise


def _train_in(world: World, cfg: TrainConfig, out: Path, resume: bool, log: Callable, stop_after: Optional[int],
              t_start: float) -> TrainResult:
    device = world.device

    # Output directory first: an unwritable or full disk fails before any work.
    if world.is_main:
        rough = build_model_config(cfg.model, vocab_size=None)
        from .models import build_model

        with torch.device("meta"):
            n_rough = sum(p.numel() for p in build_model(rough).parameters())
        preflight(out, n_rough, cfg.checkpoint.keep)
        (out / RUN_CONFIG).write_text(config_to_toml(cfg))
    barrier(world)

    tokens_dir, data_desc = _prepare_data(cfg, out, world, log)
    tokenizer = load_saved_tokenizer(tokens_dir, fix="delete that token cache directory to rebuild it")
    data = TokenData.open(tokens_dir, cfg.train.seq_len, cfg.data.val_fraction, cfg.train.seed)
    T, B, A = cfg.train.seq_len, cfg.train.batch_size, cfg.train.grad_accum
    micro = B // (world.size * A)

    vocab = cfg.model.get("vocab_size")  # a larger vocabulary than the tokenizer's may be asked for (padding)
    if vocab is not None and (not isinstance(vocab, int) or vocab < tokenizer.vocab_size):
        raise MMFError(f"[model] vocab_size = {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}; "
                       "drop it (the tokenizer sets it) or raise it")
    mcfg = build_model_config(cfg.model, vocab_size=vocab or tokenizer.vocab_size)
    mcfg.bos_token_id, mcfg.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    if mcfg.arch == "transformer++":
        mcfg.max_position_embeddings = max(mcfg.max_position_embeddings, T)
    from .models import build_model

    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights (FSDP does not broadcast them)
    base = build_model(mcfg).init_weights().to(device)
    n_params = sum(p.numel() for p in base.parameters())
    lb = getattr(base.model, "lower_bounds", None)
    if lb is not None and len(base.model.layers) == 1:
        lb.requires_grad_(False)  # layer 0 has no lower bound: with one layer it gets no gradient (DDP would stall)
    model = base
    if world.distributed:
        if cfg.distributed.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in base.model.layers:
                fully_shard(layer)
            fully_shard(base)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(base, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.precision.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(base, cfg, device)
    use_bf16 = cfg.precision.dtype == "bf16" or (cfg.precision.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    run_config = config_to_toml(cfg)
    start = 0
    if resume:
        ckpt = list_checkpoints(out)[-1]
        try:
            st = load_training_checkpoint(ckpt, base, optimizer)
        except (RuntimeError, KeyError, ValueError) as e:
            raise MMFError(f"{ckpt}: cannot restore the training state ({' '.join(str(e).split())[:240]}); "
                           "resume with the run's own model and optimiser settings") from None
        start = st["step"]
        if st.get("world_batch") not in (None, B):
            raise MMFError(f"{ckpt}: saved with train.batch_size {st['world_batch']}, now {B}; keep the batch size to resume")
        log(f"resuming {out} from {ckpt.name} (step {start})")
        if world.is_main and (out / METRICS_FILE).exists():  # drop records past the checkpoint
            lines = [l for l in (out / METRICS_FILE).read_text().splitlines() if json.loads(l).get("step", 0) <= start]
            (out / METRICS_FILE).write_text("".join(l + "\n" for l in lines))
    total = cfg.train.steps
    if start >= total:
        raise MMFError(f"{out} already reached step {start} of {total}; raise it with --set train.steps=N to continue")

    log(f"model {mcfg.arch} ({cfg.model.get('preset', mcfg.model_type)}), {n_params / 1e6:.2f}M parameters, "
        f"vocab {mcfg.vocab_size} ({cfg.tokenizer.type} tokenizer); data: {data_desc}, "
        f"{data.tokens.shape[0]:,} tokens ({data.n_train:,} train); {total} steps x {B} x {T} tokens on "
        f"{world.size} x {device.type}{' bf16' if use_bf16 else ''}; output {out}")

    reporter = Reporter(world, out, total, start, cfg.logging.progress, log)
    losses: list = []
    interrupted = False
    last_ckpt = list_checkpoints(out)[-1] if resume else None
    val_loss, val_step = float("nan"), 0  # nan: not measured in this run (yet)
    t_loop = time.time()
    t_log, tok_log, window = time.time(), 0, []
    step = start

    def state(step_done: int) -> dict:
        return {"step": step_done, "samples_seen": step_done * B, "tokens_seen": step_done * B * T,
                "world_batch": B, "seq_len": T, "epoch": step_done * B / max(1, data.n_windows),
                "world_size": world.size, "val_loss": val_loss if math.isfinite(val_loss) else None,
                "tokens_dir": str(tokens_dir),
                "unigram_entropy": data.unigram_entropy, "mmf_version": __version__}

    def checkpoint(step_done: int) -> Path:
        return save_training_checkpoint(world, base, optimizer, mcfg, tokenizer, out, step_done, state(step_done),
                                        run_config, cfg.checkpoint.keep)

    try:
        with _StopFlag() as stop:
            model.train()
            for step in range(start, total):
                lr, wd = schedule(cfg, step)
                optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
                optimizer.param_groups[0]["weight_decay"] = wd
                loss_sum = torch.zeros((), device=device)
                for m in range(A):
                    x = torch.from_numpy(data.windows(batch_indices(step, B, m, A, world.rank, world.size))).to(device)
                    sync = nullcontext() if (m == A - 1 or not hasattr(model, "no_sync")) else model.no_sync()
                    with sync:
                        loss = loss_of(model, x, autocast)
                        (loss / A).backward()
                    loss_sum += loss.detach()
                step_loss = float(all_mean(world, loss_sum / A))
                if not math.isfinite(step_loss):
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was written yet"
                    raise MMFError(f"the loss became {step_loss} at step {step + 1}{where}. Lower optim.lr "
                                   "(--set optim.lr=...) or raise schedule.warmup_steps, then --resume or restart")
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                losses.append(step_loss)
                window.append(step_loss)
                tok_log += B * T
                logged = done % cfg.logging.every == 0 or done == total
                now = time.time()
                eta = (total - done) * (now - t_loop) / max(done - start, 1)
                record = None
                if logged:  # loss and tokens_per_s: means over the steps since the previous record
                    record = {"step": done, "loss": sum(window) / len(window), "steps_averaged": len(window),
                              "lr": lr, "tokens": done * B * T, "tokens_per_s": tok_log / max(now - t_log, 1e-9),
                              "time": now - t_start}
                    reporter.write(record)
                    t_log, tok_log, window = now, 0, []
                reporter.step(done, total, eta, record)
                if done % cfg.logging.eval_every == 0 and done != total:
                    val_loss, val_step = evaluate(world, model, data, cfg.logging.eval_tokens, micro, autocast), done
                    reporter.write({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                                    "tokens": done * B * T, "time": time.time() - t_start})
                    reporter.message(f"step {done}: validation loss {val_loss:.4f} "
                                     f"(unigram entropy {data.unigram_entropy:.4f}) nats/token")
                halt = any_flag(world, stop.set or (stop_after is not None and done >= stop_after))
                if halt and done != total:
                    interrupted = True
                    last_ckpt = checkpoint(done)
                    reporter.close()
                    log(f"interrupted at step {done}/{total}; checkpoint saved to {last_ckpt}. "
                        f"Continue with: mmf train --resume --out {out}")
                    break
                if done % cfg.checkpoint.every == 0 and done != total:
                    last_ckpt = checkpoint(done)
        if not interrupted:
            val_loss, val_step = evaluate(world, model, data, cfg.logging.eval_tokens, micro, autocast), total
            reporter.write({"step": total, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                            "tokens": total * B * T, "time": time.time() - t_start})
            last_ckpt = checkpoint(total)
    finally:
        reporter.close()
    seconds = time.time() - t_loop
    done_steps = len(losses)
    if world.is_main and cfg.logging.plot and (out / METRICS_FILE).exists():
        plot_metrics(out / METRICS_FILE, out / PLOT_FILE, data.unigram_entropy)
    return TrainResult(out=out, checkpoint=last_ckpt, step=start + done_steps, losses=losses, val_loss=val_loss,
                       val_step=val_step, unigram_entropy=data.unigram_entropy, tokens=done_steps * B * T,
                       seconds=seconds,
                       tokens_per_s=done_steps * B * T / max(seconds, 1e-9), interrupted=interrupted,
                       params=n_params, is_main=world.is_main)


def run_train(config: Optional[str], data: Optional[list], out: Optional[Path], resume: bool, overrides: list,
              log: Callable = print) -> TrainResult:
    """What ``mmf train`` does: resolve the config (the run's own when resuming), train, summarise."""
    if resume:
        if out is None:
            raise MMFError("--resume needs --out RUN_DIR (the directory of the run to continue)")
        if config is not None or data:
            raise MMFError("--resume continues with the run's saved config; drop --config/--data (use --set to change it)")
        cfg = resume_config(out, overrides)
    else:
        cfg = load_train_config(config, overrides, data)
    return train(cfg, out, resume, log)
