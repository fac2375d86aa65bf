"""Shared fixtures: small random checkpoints of both architectures (built, never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

import mmf
from mmf.config import LlamaConfig, MMFConfig
from mmf.models import build_model

SMALL_MMF = dict(vocab_size=259, hidden_size=64, num_hidden_layers=2, intermediate_size=96)
SMALL_LLAMA = dict(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=96)


def small_model(arch: str = "mmf", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "mmf":
        cfg = MMFConfig(**{**SMALL_MMF, **overrides})
    else:
        cfg = LlamaConfig(**{**SMALL_LLAMA, **overrides})
    model = build_model(cfg).init_weights().eval()
    if arch == "mmf":  # non-trivial norms and lower bounds, so tests see them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
            if model.model.lower_bounds is not None:
                model.model.lower_bounds.normal_(0, 1)
    return model


def median_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over (sequence, position) of |a - b| / |b| of the logit vectors (docs/reference-semantics.md)."""
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()


@pytest.fixture(scope="session")
def tiny_mmf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mmf-small"
    mmf.save_checkpoint(small_model("mmf"), path, tokenizer=mmf.ByteTokenizer())
    return path


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama-small"
    mmf.save_checkpoint(small_model("transformer++"), path, tokenizer=mmf.ByteTokenizer())
    return path


def run_cli(*args, input_text=None, env=None):
    """Run the installed `mmf` console script; returns CompletedProcess (text mode)."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmf.cli.main", *map(str, args)], capture_output=True, text=True,
                          input=input_text, env=full_env, timeout=600)


def main_in_process(capsys, *args):
    """Run `mmf ARGS` through its entry point in this process (fast); returns (exit code, stdout, stderr)."""
    from mmf.cli.main import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err
