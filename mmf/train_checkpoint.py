"""A training checkpoint: a model checkpoint plus the state that ``--resume`` needs, without pickle.

``OUT/step-NNNNNNN/`` is a normal model checkpoint (``config.json``, ``model.safetensors``, the
tokenizer) that ``mmf generate`` and ``mmf.load_model`` read, plus:

* ``optimizer.safetensors``: AdamW moments and step counts, keyed ``state.<param>.<name>``;
* ``trainer_state.json``: step, samples and tokens seen (the data position), optimiser param
  groups, the run's metrics so far; ``rng.safetensors``: the torch RNG states;
* ``train_config.toml``: the run's config.

It is written atomically (a temporary directory, then a rename); the oldest beyond
``checkpoint.keep`` are then removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .checkpoint import iter_tensors, write_safetensors_sharded
from .checkpoint_layout import CONFIG_FILE
from .distributed import World, barrier
from .errors import MMFError
from .outputs import atomic_directory, written_by_mmf
from .run_dir import OPTIM_FILE, RNG_FILE, RUN_CONFIG, STATE_FILE, checkpoint_dir, list_checkpoints


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """A full optimiser state dict -> (its tensors for ``optimizer.safetensors``, the rest as JSON)."""
    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{fqn}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{fqn}.{k}"] = v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The inverse of ``_flatten_optimizer``."""
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
    path = checkpoint_dir(out, step)
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
            with atomic_directory(path, overwrite=True, is_ours=written_by_mmf) as tmp:  # may replace its own kind
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


def damaged_checkpoint_error(path: Path, problem: str) -> MMFError:
    """One line for a checkpoint with a file missing or unreadable (``problem`` names it): remove the
    checkpoint to resume from the previous complete one (a crash or a full disk, not a setting to change)."""
    earlier = [c for c in list_checkpoints(path.parent) if c.name < path.name]
    fix = (f"remove {path} and --resume again (from {earlier[-1].name}, the previous complete checkpoint)"
           if earlier else "no earlier checkpoint is left: start the run again")
    return MMFError(f"{problem}; the checkpoint is damaged: {fix}")


def _read_part(path: Path, name: str, read):
    """``read(path / name)``, or the damaged-checkpoint line when the file is missing or unreadable."""
    if not (path / name).is_file():
        raise damaged_checkpoint_error(path, f"{path / name} is missing")
    try:
        return read(path / name)
    except Exception as e:  # JSON, safetensors and I/O errors alike: the file cannot be used
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise damaged_checkpoint_error(path, f"{path / name} cannot be read ({first})") from None


# Model settings a resumed run may change: the tokenizer's ids (the checkpoint's own tokenizer is used) and the
# position limit (no weights; training raises it to train.seq_len for Transformer++).
_RESUME_FREE_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def check_resume_model(path: Path, model: dict) -> None:
    """Refuse, before any work, a ``--resume`` whose model differs from the one checkpoint ``path`` holds: the
    ``[model]`` table of the config to resume (``--set model.KEY=...`` included) against ``path``'s
    ``config.json``, the vocabulary size taken from the checkpoint unless the table sets one. One line naming
    the settings that differ (loading the state would fail with PyTorch's size mismatch, or silently train
    another model)."""
    from .config import load_hf_config
    from .train_config import build_model_config

    try:
        saved = load_hf_config(path / CONFIG_FILE)
    except MMFError as e:
        raise damaged_checkpoint_error(path, str(e)) from None
    vocab = model.get("vocab_size")
    now = build_model_config(model, vocab_size=saved.vocab_size if vocab is None else vocab)
    a, b = saved.to_hf_dict(), now.to_hf_dict()
    keys = ["model_type"] if a["model_type"] != b["model_type"] else \
        [k for k in b if k not in _RESUME_FREE_KEYS and k != "architectures" and a.get(k) != b[k]]
    if "intermediate_size" in keys and len(keys) > 1 and now.intermediate_size is None:
        keys.remove("intermediate_size")  # derived from hidden_size here: the key the user changed is named
    if keys:
        fix = "the --set that changes model.preset" if keys == ["model_type"] else \
            "--set " + " and ".join(f"model.{k}" for k in keys)
        raise MMFError(f"{path}: saved with {' and '.join(f'model.{k} {a.get(k)}' for k in keys)}, now "
                       f"{' and '.join(str(b[k]) for k in keys)}; resume with the run's own model settings "
                       f"(drop {fix})")


def load_training_checkpoint(path: Path, base, optimizer) -> dict:
    """Restore model, optimiser and RNG state from ``path`` (every rank reads it).

    Every file is read before anything is restored: a missing or unreadable one is one ``MMFError`` line
    naming it; a ``RuntimeError``/``KeyError``/``ValueError`` afterwards means other model or optimiser settings."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = _read_part(path, STATE_FILE, lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("optimizer"), dict) or "param_groups" not in state["optimizer"]:
        raise damaged_checkpoint_error(path, f"{path / STATE_FILE} lacks the step or the optimiser's param groups")
    otensors = _read_part(path, OPTIM_FILE, lambda p: load_file(str(p)))
    rng = _read_part(path, RNG_FILE, lambda p: load_file(str(p)))
    if not isinstance(rng.get("torch_cpu"), torch.Tensor) or rng["torch_cpu"].dtype != torch.uint8:
        raise damaged_checkpoint_error(path, f"{path / RNG_FILE} lacks the CPU random state")
    try:
        msd = dict(iter_tensors(path))
    except MMFError as e:
        raise damaged_checkpoint_error(path, str(e)) from None
    if getattr(base.config, "tie_word_embeddings", False) and "lm_head.weight" not in msd:
        msd["lm_head.weight"] = msd["model.embeddings.weight"]
    set_model_state_dict(base, msd, options=StateDictOptions(full_state_dict=True))
    osd = _unflatten_optimizer(otensors, state["optimizer"])
    # strict=False: a parameter that never had a gradient (layer 0's MLGRU lower bound) has no AdamW state
    set_optimizer_state_dict(base, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return state
