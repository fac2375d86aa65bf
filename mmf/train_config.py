"""The training config: one TOML file, strictly validated, with presets and ``--set`` overrides.

A config has these tables (every key optional; defaults come from the preset named by ``base``)::

    base = "tiny"                       # a preset: tiny, 370m, ..., transformer++-tiny, ...
    name = "tiny"                       # names the default output directory runs/<name>-<time>
    [model]      preset = "tiny"  (plus any model field to change), or arch = "mmf" | "transformer++"
                 with the full field list; vocab_size always comes from the tokenizer
    [data]       paths, val_fraction, text_field, builtin_bytes, builtin_seed, cache_dir
    [tokenizer]  type = "byte" | "bpe" | "file", vocab_size (bpe), path (file)
    [optim]      lr, betas, eps, weight_decay, grad_clip
    [schedule]   type = "cosine" | "two_stage" | "constant", warmup_steps, min_lr_ratio, ...
    [train]      steps, batch_size (global sequences per step), grad_accum, seq_len, seed
    [precision]  dtype = "auto" | "fp32" | "bf16", device = "auto" | "cpu" | "cuda", compile
    [checkpoint] every, keep
    [logging]    every, eval_every, eval_tokens, progress, plot
    [distributed] strategy = "ddp" | "fsdp"

``mmf train --print-config`` prints the resolved config in this form.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import _SIZES, ARCHS, dataclass_from_dict, load_toml, model_config_from_dict, model_preset, split_preset
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def check_seed(seed: int, name: str, where: str) -> None:
    if not 0 <= seed < 2**63:
        raise ConfigError(f"{where}: {name} must be in [0, 2**63), got {seed}")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # text files, directories, .jsonl; empty = embedded corpus
    val_fraction: float = 0.02  # the tail of the token stream held out for validation
    text_field: str = "text"  # the JSONL field holding each document's text
    builtin_bytes: int = 3_000_000  # size of the embedded grammar corpus when paths is empty
    builtin_seed: int = 0
    cache_dir: str = ""  # token caches; "" = <output parent>/.mmf-cache

    def validate(self, where: str) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{where}: val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.builtin_bytes < 10_000:
            raise ConfigError(f"{where}: builtin_bytes must be at least 10000")
        check_seed(self.builtin_seed, "builtin_seed", where)


@dataclass
class TokenizerConfig:
    type: str = "byte"  # byte | bpe (trained on the data) | file (a tokenizer.json)
    vocab_size: int = 1024  # bpe only
    min_frequency: int = 2  # bpe only
    path: str = ""  # file only: tokenizer.json, or a directory holding one

    def validate(self, where: str) -> None:
        if self.type not in ("byte", "bpe", "file"):
            raise ConfigError(f"{where}: type must be 'byte', 'bpe' or 'file', got {self.type!r}")
        if self.type == "bpe" and not 260 <= self.vocab_size <= 4_000_000:
            raise ConfigError(f"{where}: vocab_size must be at least 260 for a byte-level BPE")
        if self.min_frequency < 0:
            raise ConfigError(f"{where}: min_frequency must be >= 0, got {self.min_frequency}")
        if self.type == "file" and not self.path:
            raise ConfigError(f"{where}: type = 'file' needs path = 'PATH/tokenizer.json'")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, lower bounds)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{where}: lr must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}: betas must be two numbers in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"{where}: eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"{where}: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"{where}: grad_clip must be a finite number > 0, or 0 for no clipping, "
                              f"got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    type: str = "cosine"  # cosine | two_stage | constant
    warmup_steps: int = 100  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak
    stage2_lr_ratio: float = 0.5  # two_stage: the second half restarts its cosine at this fraction of the peak
    stage2_weight_decay: float = 0.0  # two_stage: weight decay in the second half (the paper removes it)

    def validate(self, where: str) -> None:
        if self.type not in ("cosine", "two_stage", "constant"):
            raise ConfigError(f"{where}: type must be 'cosine', 'two_stage' or 'constant', got {self.type!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.stage2_lr_ratio <= 1:
            raise ConfigError(f"{where}: need warmup_steps >= 0, 0 <= min_lr_ratio <= 1, 0 < stage2_lr_ratio <= 1")
        if not (math.isfinite(self.stage2_weight_decay) and self.stage2_weight_decay >= 0):
            raise ConfigError(
                f"{where}: stage2_weight_decay must be a finite number >= 0, got {self.stage2_weight_decay}")


@dataclass
class TrainSection:
    steps: int = 1000  # optimiser steps
    batch_size: int = 16  # global batch in sequences per optimiser step (all ranks, all micro-steps)
    grad_accum: int = 1  # micro-steps per optimiser step
    seq_len: int = 128
    seed: int = 0

    def validate(self, where: str) -> None:
        for k in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{where}: {k} must be positive, got {getattr(self, k)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{where}: batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        check_seed(self.seed, "seed", where)


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; fp32; bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model

    def validate(self, where: str) -> None:
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{where}: dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{where}: device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # the last K checkpoints are kept

    def validate(self, where: str) -> None:
        if self.every <= 0 or self.keep <= 0:
            raise ConfigError(f"{where}: every and keep must be positive")


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 250  # steps between validation passes (and one at the end)
    eval_tokens: int = 131072  # validation tokens per pass (at most the whole split)
    progress: bool = True  # rich progress bar
    plot: bool = True  # loss_curve.png at the end

    def validate(self, where: str) -> None:
        if self.every <= 0 or self.eval_every <= 0 or self.eval_tokens <= 0:
            raise ConfigError(f"{where}: every, eval_every and eval_tokens must be positive")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (used only under torchrun with more than one process)

    def validate(self, where: str) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"{where}: strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")


@dataclass
class TrainConfig:
    base: str = "tiny"
    name: str = "tiny"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, where: str) -> None:
        build_model_config(self.model, vocab_size=None, where=f"{where} [model]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Presets: every model preset name, each with training defaults that suit its size.

def _preset_dict(name: str) -> dict:
    arch, size = split_preset(name)
    if size not in _SIZES or arch not in ARCHS:
        model_preset(name)  # raises the error listing valid presets
    d: dict[str, Any] = {"base": name, "name": name.replace("+", "p"), "model": {"preset": name}}
    if size == "tiny":
        # The embedded default: finishes in minutes on two CPU cores (see README "mmf train").
        d.update(
            tokenizer={"type": "bpe", "vocab_size": 1024},
            optim={"lr": 4e-3 if arch == "mmf" else 2e-3, "weight_decay": 0.1},
            schedule={"type": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1},
            train={"steps": 300, "batch_size": 16, "seq_len": 128},
            checkpoint={"every": 100, "keep": 2},
            logging={"every": 10, "eval_every": 100, "eval_tokens": 32768},
        )
    else:
        # GPU scale, the paper's recipe shape: 2048 tokens, ~0.5M tokens per step; the MatMul-free
        # model uses the two-stage schedule (lr lowered and weight decay removed at the midpoint).
        lr = {"370m": 1.5e-3, "1.3b": 1.2e-3, "2.7b": 8e-4, "13b": 4e-4}[size]
        d.update(
            tokenizer={"type": "bpe", "vocab_size": 32000},
            optim={"lr": lr if arch == "mmf" else lr / 2, "weight_decay": 0.1},
            schedule={"type": "two_stage" if arch == "mmf" else "cosine", "warmup_steps": 375},
            train={"steps": 20000, "batch_size": 256, "grad_accum": 8, "seq_len": 2048},
            precision={"dtype": "auto"},
            checkpoint={"every": 1000, "keep": 3},
            logging={"every": 10, "eval_every": 1000, "eval_tokens": 1_048_576},
            distributed={"strategy": "fsdp" if size in ("2.7b", "13b") else "ddp"},
        )
    return d


def preset_names() -> list[str]:
    return list(_SIZES) + [f"{a}-{s}" for a in ARCHS for s in _SIZES]


def build_model_config(model: dict, vocab_size, where: str = "[model]"):
    """The model config of a ``[model]`` table: ``preset`` plus changed fields, or a full ``arch`` table."""
    d = dict(model)
    preset = d.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{where}: preset must be a string")
        if "arch" in d or "model_type" in d:
            raise ConfigError(f"{where}: give either preset or arch/model_type, not both")
        try:
            base = model_preset(preset)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        merged = dataclasses.asdict(base)
        merged.update(d)
        d = merged
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
    return model_config_from_dict(d, where)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "model" and isinstance(v, dict) and ({"preset", "arch", "model_type"} & set(v)):
            out[k] = copy.deepcopy(v)  # a new model replaces the preset's, it does not merge into it
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=1e-3'`` -> (['optim', 'lr'], 0.001). The value is read as TOML, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set optim.lr=1e-3")
    key, raw = item.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {item!r}: bad key {key!r}; expected SECTION.KEY=VALUE")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        fixed = _toml_number_spelling(raw)
        if fixed is not None:
            raise ConfigError(f"--set {item!r}: TOML numbers need a digit on both sides of the decimal point; "
                              f"write {key.strip()}={fixed}") from None
        value = raw  # bare words: --set schedule.type=two_stage
    return keys, value


def _toml_number_spelling(raw: str):
    """``'.001'`` -> ``'0.001'``, ``'1.'`` -> ``'1.0'``, ``'[.9, .95]'`` -> ``'[0.9, 0.95]'``: the TOML spelling
    of numbers written as Python or C would accept them; None if ``raw`` is not such a value."""
    fixed = re.sub(r"(?<![\w.])([+-]?)\.(\d)", r"\g<1>0.\2", raw)  # .5 -> 0.5
    fixed = re.sub(r"(\d)\.(?![\d])", r"\1.0", fixed)  # 1. -> 1.0, 1.e3 -> 1.0e3
    if fixed == raw:
        return None
    try:
        value = tomllib.loads(f"v = {fixed}")["v"]
    except tomllib.TOMLDecodeError:
        return None
    numbers = value if isinstance(value, list) else [value]
    return fixed if numbers and all(isinstance(v, float) for v in numbers) else None


def load_train_config(spec: str | None = None, overrides: list[str] | None = None,
                      data: list[str] | None = None, given: str = "--set") -> TrainConfig:
    """Resolve ``--config PRESET|FILE.toml`` + ``--data`` + ``--set`` into a validated TrainConfig. ``given``: the
    options the overrides came from, as messages name them (``--set``, ``--batch-size``, ...)."""
    spec = spec or "tiny"
    p = Path(spec)
    if p.suffix == ".toml" or p.is_file():
        raw = load_toml(p)
        where = str(p)
        base_name = raw.get("base", "tiny")
        if not isinstance(base_name, str):
            raise ConfigError(f"{where}: base must be a preset name")
        d = _merge(_preset_dict(base_name), raw)
        if "name" not in raw:
            d["name"] = p.stem
    else:
        if spec not in preset_names():
            raise ConfigError(f"unknown config {spec!r}: give a .toml file or a preset ({', '.join(preset_names())})")
        d = _preset_dict(spec)
        where = f"preset {spec}"
    if data:
        d.setdefault("data", {})["paths"] = [str(x) for x in data]
    for item in overrides or []:
        keys, value = parse_override(item)
        target = d
        for k in keys[:-1]:
            nxt = target.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is a value, not a table")
            target = nxt
        if keys == ["base"]:
            raise ConfigError(f"--set {item!r}: base, the preset a config starts from, cannot be changed by --set; "
                              "give the preset with -c/--config PRESET, or base = \"PRESET\" in the TOML file")
        if len(keys) == 2 and keys[0] == "model" and keys[1] in ("preset", "arch", "model_type"):
            d["model"] = {keys[1]: value}  # a new model replaces the preset's, it does not merge into it
        else:
            target[keys[-1]] = value
    if overrides:
        where = f"{where} (with {given})"
    return dataclass_from_dict(TrainConfig, d, where)


# A TOML basic string's escapes; other control characters (U+0000-U+001F, U+007F) are written as \uXXXX.
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _is_control(c: str) -> bool:
    return c < " " or c == "\x7f"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if _is_control(c) else c) for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(type(v))


def config_to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that ``--config`` reads back to the same config."""
    d = cfg.to_dict()
    lines = [f"base = {_toml_value(d.pop('base'))}", f"name = {_toml_value(d.pop('name'))}"]
    for section, table in d.items():
        lines.append("")
        lines.append(f"[{section}]")
        for k, v in table.items():
            if v is None:
                continue  # TOML has no null: an absent key means the default
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
