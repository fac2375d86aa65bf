"""Run an `mmf export-onnx` directory through ONNX Runtime, with the torch model's calling convention.

``OnnxCausalLM(dir)(input_ids, cache=None)`` returns ``ModelOutput(logits, cache)`` like the torch
models, so ``mmf.generate.generate_ids`` drives it unchanged: the first call runs ``prefill.onnx``,
later calls run ``decode.onnx`` one token per row, the cache holding the graphs' state tensors
(MatMul-free: one fp32 vector per layer; Transformer++: the KV cache) as numpy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import CheckpointError, MMFError
from .models.common import ModelOutput

MANIFEST_FILE = "mmf_onnx.json"


@dataclass
class OnnxCache:
    """The state tensors of the decode graph, keyed by its input names (``past.{l}.*``)."""

    tensors: dict = field(default_factory=dict)
    seen_tokens: int = 0

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such ONNX export directory; create one with `mmf export-onnx`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is a checkpoint, not an ONNX export (no {MANIFEST_FILE}); pass it "
                                  "as CHECKPOINT without --onnx, or export it with `mmf export-onnx`") from None
        raise CheckpointError(f"{directory}: no {MANIFEST_FILE}; is this a directory written by "
                              "`mmf export-onnx`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-run `mmf export-onnx`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "mmf-onnx":
        raise CheckpointError(f"{path}: not an mmf ONNX manifest; re-run `mmf export-onnx`")
    if manifest.get("format_version") != 1:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')} is not supported by this mmf; "
                              "re-export with this version")
    return manifest


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MMFError("onnxruntime is not installed; pip install onnxruntime") from None
    return onnxruntime


class OnnxCausalLM:
    """An exported model run by ONNX Runtime.

    ``fold_constants`` (default True) lets ONNX Runtime fold the in-graph unpacking of 2-bit weights
    at load time: faster per token, but it then holds the unpacked int8 weights (1 byte per weight).
    ``False`` keeps the 2-bit bytes in memory and unpacks them at every call.

    ONNX Runtime sessions do not share weights: with both graphs loaded the weights are held twice.
    ``decode_only=True`` loads ``decode.onnx`` alone (half the memory) and feeds the prompt through
    it one token at a time, starting from an empty state (slower prefill, the same numbers).
    """

    def __init__(self, directory, providers: Optional[list] = None, fold_constants: bool = True,
                 threads: int = 0, decode_only: bool = False):
        from .config import model_config_from_dict

        ort = _ort()
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.config = model_config_from_dict(self.manifest["config"], str(self.directory / MANIFEST_FILE),
                                             hf=True)  # a to_hf_dict, as a checkpoint's config.json
        self.arch = self.manifest["arch"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 4  # fatal only: a load error is raised, and reported by mmf in one line
        disabled = [] if fold_constants else ["ConstantFolding"]
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {}
        for kind in (("decode",) if decode_only else ("prefill", "decode")):
            path = self.directory / self.manifest["files"][kind]
            if not path.exists():
                raise CheckpointError(f"{path}: missing; re-run `mmf export-onnx`")
            try:
                self.sessions[kind] = ort.InferenceSession(str(path), so, providers=providers,
                                                           disabled_optimizers=disabled)
            except Exception as e:  # onnxruntime raises its own exception classes
                raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        _release_freed_memory()
        self.state = self.manifest["state"]
        self._logits_dtype = np.float16 if self.manifest["dtype"] == "fp16" else np.float32

    def __call__(self, input_ids, cache: Optional[OnnxCache] = None) -> ModelOutput:
        ids = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
        ids = ids.astype(np.int64, copy=False)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise MMFError(f"input_ids must be (batch, seq) with seq >= 1, got shape {ids.shape}")
        if cache is None and "prefill" not in self.sessions:
            cache = self.empty_cache(ids.shape[0])
        if cache is None:
            outs = self.sessions["prefill"].run(None, {"input_ids": ids})
            names = [o.name for o in self.sessions["prefill"].get_outputs()]
            got = dict(zip(names, outs))
            tensors = {s["decode_input"]: got[s["prefill_output"]] for s in self.state}
            return ModelOutput(torch.from_numpy(got["logits"]), OnnxCache(tensors, ids.shape[1]))
        logits = []
        for t in range(ids.shape[1]):  # the decode graph takes one token per row
            outs = self.sessions["decode"].run(None, {"input_ids": ids[:, t:t + 1], **cache.tensors})
            names = [o.name for o in self.sessions["decode"].get_outputs()]
            got = dict(zip(names, outs))
            cache = OnnxCache({s["decode_input"]: got[s["decode_output"]] for s in self.state}, cache.seen_tokens + 1)
            logits.append(got["logits"])
        return ModelOutput(torch.from_numpy(np.concatenate(logits, axis=1)), cache)

    def empty_cache(self, batch: int) -> OnnxCache:
        """The state before any token: MatMul-free zeros (batch, d); Transformer++ a KV cache of length 0."""
        dtypes = {"float32": np.float32, "float16": np.float16}
        tensors = {}
        for spec in self.manifest["graphs"]["decode"]["inputs"][1:]:
            shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in spec["shape"]]
            tensors[spec["name"]] = np.zeros(shape, dtypes[spec["dtype"]])
        return OnnxCache(tensors, 0)


def onnx_source(checkpoint: Optional[Path], onnx: Optional[Path]) -> Optional[Path]:
    """`mmf generate` takes a CHECKPOINT or ``--onnx DIR``, exactly one; returns the ONNX directory or None."""
    if checkpoint is not None and onnx is not None:
        raise MMFError("give either a CHECKPOINT or --onnx DIR, not both")
    if checkpoint is None and onnx is None:
        raise MMFError("no model: give a CHECKPOINT directory or --onnx DIR (an `mmf export-onnx` output)")
    return onnx


def _release_freed_memory() -> None:
    """Give the transient memory of ONNX Runtime's load-time constant folding back to the OS.

    Folding the in-graph unpacking of 2-bit weights allocates a few temporaries the size of the
    int8 weights; glibc keeps them mapped after they are freed (RSS about 5x the int8 weights
    instead of 1x) unless asked to trim. A no-op off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

