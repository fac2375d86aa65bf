"""Training loop: one process, or many under torchrun (DDP or FSDP), for both architectures.

Read top to bottom: the learning-rate schedule, the optimiser, the loss and validation, then
``train``, which checks the output directory and the memory before anything else, prepares the
token cache, the model and the optimiser, then runs the loop. Every ``checkpoint.every`` steps, at
the end, on Ctrl-C and on ``stop_after`` it writes ``OUT/step-NNNNNNN/``, atomically, keeping the
last ``checkpoint.keep``.

Around the loop, one module per job: ``mmf.run_dir`` (the run directory: its files, creating and
checking it, cleaning up after a run that failed before its first checkpoint), ``mmf.memory``
(whether a step fits, checked first), ``mmf.train_checkpoint`` (what a checkpoint holds beside the
model, without pickle, and restoring it), ``mmf.train_report`` (progress, ``metrics.jsonl``, the
loss curve), ``mmf.data`` (the token cache and the order of the windows).

The data order is a pure function of the global sample index (``mmf.data``), the learning rate a
pure function of the step, so ``--resume`` continues bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import __version__
from .data import (BUILTIN_PREFIX, META_FILE, TokenData, batch_indices, builtin_corpus_file, cache_key, prepare_tokens,
                   resolve_files)
from .distributed import World, all_mean, all_sum, any_flag, barrier, broadcast_object, init_world, shutdown
from .errors import MMFError
from .memory import check_training_memory
from .run_dir import (CKPT_PREFIX, METRICS_FILE, PLOT_FILE, RUN_CONFIG, STATE_FILE, check_out_dir, check_resume_has_out,
                      discard_failed_run, list_checkpoints, make_run_dir, preflight, resume_config)
from .outputs import write_text_output
from .tokenizer import HF_TOKENIZER_FILE, load_saved_tokenizer
from .train_checkpoint import (check_resume_model, damaged_checkpoint_error, load_training_checkpoint,
                               save_training_checkpoint)
from .train_config import TrainConfig, build_model_config, config_to_toml, load_train_config
from .train_report import Reporter, drop_metrics_after, plot_metrics
from .units import plural


@dataclass
class TrainResult:
    """What ``train`` returns: where the run is, its last checkpoint and its figures."""

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
    total_steps: int = 0  # train.steps of the run

    def resume_command(self) -> Optional[str]:
        """The command that continues an interrupted run; None when it was not interrupted or had done its
        last step (Ctrl-C then skipped only the final validation)."""
        if not self.interrupted or self.step >= self.total_steps:
            return None
        return f"mmf train --resume --out {shlex.quote(str(self.out))}"

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
# Optimiser, loss, validation

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
    """Mean next-token cross-entropy (nats/token) of windows ``x`` (batch, seq_len + 1)."""
    with autocast():
        logits = model(x[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(world: World, model, data: TokenData, max_tokens: int, batch: int, autocast,
                    stop: Optional[Callable[[], bool]] = None) -> Optional[float]:
    """Mean validation loss (nats/token) over the first ``max_tokens`` of the validation split.

    ``stop`` (Ctrl-C; every rank calls it before each batch) ends it early: None, nothing measured."""
    was = model.training
    model.eval()
    windows = data.val_windows(max_tokens)
    mine = windows[world.rank::world.size]
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    n_batches = math.ceil(len(windows) / world.size / batch)  # the same count on every rank (FSDP needs it)
    for i in range(n_batches):
        if stop is not None and stop():
            model.train(was)
            return None
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


def _resume_tokenizer(tok_cfg, ckpt: Path, files: list, cfg: TrainConfig, source, cache_dir: Path, world: World):
    """On ``--resume``: the tokenizer settings that give the checkpoint's own token ids.

    A BPE retrained on data that changed since the run started would give ids of other meanings: the
    token cache is reused only if its tokenizer is the checkpoint's, else the data is tokenised with a
    copy of the checkpoint's ``tokenizer.json`` (``tokenizer.type = "file"``; the run config is unchanged)."""
    saved = ckpt / HF_TOKENIZER_FILE
    if tok_cfg.type == "byte":  # the byte tokenizer never changes
        return tok_cfg
    if not saved.is_file():
        raise damaged_checkpoint_error(ckpt, f"{saved} is missing")
    text = saved.read_bytes()
    usual = cache_dir / f"tokens-{cache_key(files, tok_cfg, cfg.data.text_field, source)}"
    if (usual / META_FILE).exists() and (usual / HF_TOKENIZER_FILE).is_file() \
            and (usual / HF_TOKENIZER_FILE).read_bytes() == text:
        return tok_cfg
    copy = cache_dir / f"tokenizer-{hashlib.sha256(text).hexdigest()[:16]}.json"
    if world.is_main and not copy.exists():  # named by its content, so the token cache built with it is reused
        write_text_output(copy, text, option="data.cache_dir")
    barrier(world)
    return dataclasses.replace(tok_cfg, type="file", path=str(copy))


def _prepare_data(cfg: TrainConfig, out: Path, world: World, log: Callable,
                  resume_from: Optional[Path] = None) -> tuple[Path, str]:
    """The token cache every rank reads (rank 0 builds it) and a description of the data for the log;
    ``resume_from``: the checkpoint whose tokenizer the data is tokenised with."""
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
    tok_cfg = cfg.tokenizer
    if resume_from is not None:
        tok_cfg = _resume_tokenizer(tok_cfg, resume_from, files, cfg, source, cache_dir, world)
        if tok_cfg is not cfg.tokenizer:
            log(f"using the tokenizer of {resume_from.name}, the run's own: one built now could differ "
                "(the data changed since the run started, or its token cache is gone)")
    tokens_dir = None
    if world.is_main:
        tokens_dir = prepare_tokens(files, tok_cfg, cache_dir, cfg.data.text_field, source, log)
    tokens_dir = Path(broadcast_object(world, str(tokens_dir) if tokens_dir else None))
    return tokens_dir, desc


def train(cfg: TrainConfig, out: Optional[Path] = None, resume: bool = False, log: Callable = print,
          stop_after: Optional[int] = None) -> TrainResult:
    """Train per ``cfg`` into ``out`` (default ``runs/<name>-<time>``); ``resume`` continues ``out``.

    ``stop_after=N`` stops after step N exactly as Ctrl-C would (a checkpoint, then return).
    """
    world = init_world(cfg.precision.device)
    try:
        return _check_and_train(world, cfg, out, resume, log if world.is_main else (lambda *a, **k: None), stop_after)
    finally:
        shutdown(world)


def _absolute_paths(paths: list) -> list:
    """``data.paths`` with each existing path made absolute (the embedded corpus's name and missing paths,
    reported later, as given)."""
    out = []
    for spec in paths:
        p = Path(spec).expanduser()
        out.append(os.path.abspath(p) if not spec.startswith(BUILTIN_PREFIX) and p.exists() else spec)
    return out


def _check_and_train(world: World, cfg: TrainConfig, out: Optional[Path], resume: bool, log: Callable,
                     stop_after: Optional[int]) -> TrainResult:
    """Refuse what can be refused before any work (the run to resume, ``--out``, the batch split, the
    memory), make the run directory and train in it; a run that fails before its first checkpoint
    leaves nothing behind."""
    t_start = time.time()
    check_resume_has_out(out, resume)
    if out is not None:
        check_out_dir(Path(out), resume)
    if resume:
        ckpts = list_checkpoints(Path(out))
        if not ckpts:
            raise MMFError(f"{out}: no checkpoint to resume from (expected {CKPT_PREFIX}NNNNNNN/ with {STATE_FILE})")
        check_resume_model(ckpts[-1], cfg.model)
    if not resume:  # absolute data paths in the run config: --resume then works from any directory
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=_absolute_paths(cfg.data.paths)))
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
        return _train_in_dir(world, cfg, out, resume, log, stop_after, t_start)
    except BaseException as e:
        if world.is_main and not resume:  # nothing of value (no checkpoint): leave no empty run folder behind
            discard_failed_run(out, created)
        if isinstance(e, KeyboardInterrupt):  # before the loop (data preparation) or a second Ctrl-C in it
            kept = list_checkpoints(out) if out.is_dir() else []
            log(f"interrupted; the last checkpoint is {kept[-1]}. Continue with: mmf train --resume --out {out}"
                if kept else "interrupted before the first checkpoint; nothing was saved (run the command again)")
        raise


def _train_in_dir(world: World, cfg: TrainConfig, out: Path, resume: bool, log: Callable,
                  stop_after: Optional[int], t_start: float) -> TrainResult:
    """The run in its directory ``out``: disk check, token cache, model, optimiser, the state to resume
    from, the loop, the last validation and checkpoint, the loss curve."""
    device = world.device

    # Output directory first: an unwritable or full disk fails before any work.
    if world.is_main:
        rough = build_model_config(cfg.model, vocab_size=None)
        from .models import build_model

        with torch.device("meta"):
            n_rough = sum(p.numel() for p in build_model(rough).parameters())
        preflight(out, n_rough, cfg.checkpoint.keep, cfg.train.steps, cfg.checkpoint.every)
    barrier(world)
    # The run config is written only once the state to resume from is restored and checked (below): a
    # refused --resume leaves the run as it was.
    ckpt = list_checkpoints(out)[-1] if resume else None

    tokens_dir, data_desc = _prepare_data(cfg, out, world, log, ckpt)
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
        try:
            st = load_training_checkpoint(ckpt, base, optimizer)
        except (RuntimeError, KeyError, ValueError) as e:
            raise MMFError(f"{ckpt}: cannot restore the training state ({' '.join(str(e).split())[:240]}); "
                           "resume with the run's own model and optimiser settings") from None
        start = st["step"]
        for key, saved, now in (("batch_size", st.get("world_batch"), B), ("seq_len", st.get("seq_len"), T)):
            if saved not in (None, now):
                raise MMFError(f"{ckpt}: saved with train.{key} {saved}, now {now}; keep train.{key} to resume "
                               "(the data position and token counts depend on it)")
        for group in optimizer.param_groups:  # the restored groups hold the saved values: run the config's
            group["betas"], group["eps"] = tuple(cfg.optim.betas), cfg.optim.eps
        log(f"resuming {out} from {ckpt.name} (step {start})")
    total = cfg.train.steps
    if start >= total:
        raise MMFError(f"{out} already reached step {start} of {total}; raise it with --set train.steps=N to continue")
    if world.is_main:
        if resume:
            drop_metrics_after(out / METRICS_FILE, start)
        write_text_output(out / RUN_CONFIG, run_config, option="--out")
    barrier(world)

    log(f"model {mcfg.arch} ({cfg.model.get('preset', mcfg.model_type)}), {n_params / 1e6:.2f}M parameters, "
        f"vocab {mcfg.vocab_size} ({cfg.tokenizer.type} tokenizer); data: {data_desc}, "
        f"{data.tokens.shape[0]:,} tokens ({data.n_train:,} train); {plural(total, 'step')} x {B} x {T} tokens on "
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

    def record_of(done: int, lr: float, now: float) -> dict:  # loss and tokens_per_s: means since the last record
        return {"step": done, "loss": sum(window) / len(window), "steps_averaged": len(window), "lr": lr,
                "tokens": done * B * T, "tokens_per_s": tok_log / max(now - t_log, 1e-9), "time": now - t_start}

    def val_record_of(done: int, loss: float) -> dict:
        return {"step": done, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "tokens": done * B * T,
                "time": time.time() - t_start}

    try:
        with _StopFlag() as stop:
            stopped = lambda: any_flag(world, stop.set)  # noqa: E731 (Ctrl-C: skips a validation under way)
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
                if logged:
                    record = record_of(done, lr, now)
                    reporter.write(record)
                    t_log, tok_log, window = now, 0, []
                reporter.step(done, total, eta, record)
                if done % cfg.logging.eval_every == 0 and done != total:
                    v = validation_loss(world, model, data, cfg.logging.eval_tokens, micro, autocast, stopped)
                    if v is not None:  # None: Ctrl-C during it (the checkpoint follows)
                        val_loss, val_step = v, done
                        reporter.write(val_record_of(done, val_loss))
                        reporter.message(f"step {done}: validation loss {val_loss:.4f} "
                                         f"(unigram entropy {data.unigram_entropy:.4f}) nats/token")
                halt = any_flag(world, stop.set or (stop_after is not None and done >= stop_after))
                if halt and done != total:
                    interrupted = True
                    if window:  # the steps since the last record: a partial one, so none is lost
                        reporter.write(record_of(done, lr, time.time()))
                    last_ckpt = checkpoint(done)
                    reporter.close()
                    log(f"interrupted at step {done}/{total}; checkpoint saved to {last_ckpt}. "
                        f"Continue with: mmf train --resume --out {out}")
                    break
                if done % cfg.checkpoint.every == 0 and done != total:
                    last_ckpt = checkpoint(done)
            if not interrupted:  # still under the Ctrl-C flag: an interrupt skips the validation, not the checkpoint
                v = validation_loss(world, model, data, cfg.logging.eval_tokens, micro, autocast, stopped)
                if v is None:
                    interrupted = True
                else:
                    val_loss, val_step = v, total
                    reporter.write(val_record_of(total, val_loss))
                last_ckpt = checkpoint(total)
                if interrupted:
                    reporter.close()
                    log(f"interrupted during the final validation (skipped); checkpoint of step {total} saved to "
                        f"{last_ckpt}")
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
                       params=n_params, is_main=world.is_main, total_steps=total)


def option_overrides(overrides: Optional[list], batch_size: Optional[int] = None,
                     seq_len: Optional[int] = None) -> tuple[list, str]:
    """``--set`` items followed by what ``--batch-size`` and ``--seq-len`` stand for (``train.batch_size=N``,
    ``train.seq_len=N``), and the options given, as config messages name them ("--set", "--batch-size", ...).
    A value that is not positive is refused here, naming the option the user typed."""
    items = list(overrides or [])
    given = ["--set"] if items else []
    for option, key, value in (("--batch-size", "train.batch_size", batch_size),
                               ("--seq-len", "train.seq_len", seq_len)):
        if value is None:
            continue
        if value <= 0:
            raise MMFError(f"{option} must be positive, got {value}")
        items.append(f"{key}={value}")
        given.append(option)
    return items, " and ".join(given) or "--set"


def resolve_config(config: Optional[str], data: Optional[list], out: Optional[Path], resume: bool,
                   overrides: Optional[list], batch_size: Optional[int] = None,
                   seq_len: Optional[int] = None) -> TrainConfig:
    """The config ``mmf train`` runs (what ``--print-config`` prints): the run's own when resuming; ``batch_size``
    and ``seq_len`` (``--batch-size``, ``--seq-len``) set ``train.batch_size`` and ``train.seq_len``."""
    overrides, given = option_overrides(overrides, batch_size, seq_len)
    check_resume_has_out(out, resume)
    if resume:
        if config is not None or data:
            raise MMFError("--resume continues with the run's saved config; drop --config/--data (use --set to change it)")
        return resume_config(out, overrides, given)
    return load_train_config(config, overrides, data, given)


def run_train(config: Optional[str], data: Optional[list], out: Optional[Path], resume: bool, overrides: Optional[list],
              log: Callable = print, batch_size: Optional[int] = None, seq_len: Optional[int] = None) -> TrainResult:
    """What ``mmf train`` does: resolve the config (``resolve_config``), train, summarise."""
    return train(resolve_config(config, data, out, resume, overrides, batch_size, seq_len), out, resume, log)
