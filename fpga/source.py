"""The tensors of an mmf checkpoint as an FPGA image needs them (docs/fpga.md).

Names and shapes first (headers only), then tensors one at a time: ternary weights as (int8 codes,
fp32 s_w), everything else as float values, plus the per-layer lower bounds the forget gates use
(``DERIVED_LB``). Latent and float checkpoints are read through ``iter_tensors`` and quantised by
``kernels.reference.weight_quant``; packed checkpoints through the frozen model. Both the image
builder (``fpga.image``) and the simulation that proves an image (``fpga.sim``) read the checkpoint here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional

import torch

from mmf.checkpoint import is_packed, load_config, open_safetensors
from mmf.checkpoint_layout import checkpoint_files
from mmf.errors import MMFError

DERIVED_LB = "model.layer_lower_bounds"
_PROJ_ORDER = ["attn_norm.weight", "attn.i_proj", "attn.f_proj", "attn.g_proj", "attn.g_norm.weight", "attn.o_proj",
               "mlp_norm.weight", "mlp.gate_proj", "mlp.down_proj"]


def layer_of(name: str) -> Optional[int]:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_ternary_name(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _order_key(name: str, num_layers: int):
    layer = layer_of(name)
    if layer is not None:
        rest = name.split(".", 3)[3]
        rank = next((i for i, p in enumerate(_PROJ_ORDER) if rest.startswith(p)), len(_PROJ_ORDER))
        norm_first = 0 if rest.endswith("norm.weight") and "_proj" in rest else 1  # a BitLinear's norm, then it
        return (1, layer, rank, norm_first, rest)
    head = {"model.embeddings.weight": 0, "model.lower_bounds": 1, DERIVED_LB: 2}
    if name in head:
        return (0, head[name], 0, 0, name)
    tail = {"model.norm.weight": 0, "lm_head.norm.weight": 1, "lm_head.weight": 2}
    return (2, tail.get(name, 3), 0, 0, name)


class CheckpointSource:
    """The tensors of an mmf checkpoint as the image needs them: ternary (codes, s_w) or dense values."""

    def __init__(self, path):
        self.path = Path(path)
        self.cfg = load_config(self.path)
        if self.cfg.arch != "mmf":
            raise MMFError(f"{self.path}: a {self.cfg.model_type} (Transformer++) checkpoint has no ternary weights; "
                           "fpga-image needs a MatMul-free (hgrn_bit) checkpoint")
        self.packed = is_packed(self.path)
        self._model = None
        self.shapes: dict = {}
        self.dtypes: dict = {}
        if self.packed:
            self.kind = "packed"
            model = self.model()
            for name, shape, dtype in self._model_entries(model):
                self.shapes[name], self.dtypes[name] = shape, dtype
        else:
            files = checkpoint_files(self.path)
            by_file: dict = {}
            for k, p in files.items():
                by_file.setdefault(p, []).append(k)
            for p, keys in by_file.items():
                with open_safetensors(p) as f:
                    for k in keys:
                        if k.endswith("rotary_emb.inv_freq"):
                            continue
                        sl = f.get_slice(k)
                        self.shapes[k] = tuple(sl.get_shape())
                        self.dtypes[k] = sl.get_dtype()
            self.kind = "float" if all(d in ("F16", "BF16", "F32") for d in self.dtypes.values()) else "mixed"
            self.tied_head = "lm_head.weight" not in self.shapes and "model.embeddings.weight" in self.shapes
            if self.tied_head:
                self.shapes["lm_head.weight"] = self.shapes["model.embeddings.weight"]
                self.dtypes["lm_head.weight"] = self.dtypes["model.embeddings.weight"]
        if "model.lower_bounds" in self.shapes:
            self.shapes[DERIVED_LB] = self.shapes["model.lower_bounds"]
            self.dtypes[DERIVED_LB] = "derived"
        for name in list(self.shapes):
            if is_ternary_name(name) and len(self.shapes[name]) != 2:
                raise MMFError(f"{self.path}: tensor {name} has shape {self.shapes[name]}, expected a 2-D weight")

    def model(self):
        if self._model is None:
            from mmf.checkpoint import load_model

            self._model = load_model(self.path, frozen=True)
        return self._model

    @staticmethod
    def _model_entries(model):
        from mmf.models.hgrn_bit import FrozenBitLinear

        skip = set()
        for mname, m in model.named_modules():
            if isinstance(m, FrozenBitLinear):
                yield f"{mname}.weight", (m.out_features, m.in_features), "ternary"
                skip.update({f"{mname}.codes", f"{mname}.packed", f"{mname}.weight_scale"})
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if pname not in skip and p is not None and p.is_floating_point():
                yield pname, tuple(p.shape), str(p.dtype).replace("torch.", "")

    def names(self) -> list:
        return sorted(self.shapes, key=lambda n: _order_key(n, self.cfg.num_hidden_layers))

    def iter(self, wanted: set) -> Iterator[tuple[str, object]]:
        """Yield (name, (codes int8, s_w fp32)) for ternary names and (name, float tensor) for the others."""
        from mmf.kernels.reference import weight_quant

        if self.packed:
            from mmf.models.hgrn_bit import FrozenBitLinear

            model = self.model()
            mods = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, FrozenBitLinear)}
            tensors = dict(model.named_parameters())
            tensors.update(dict(model.named_buffers()))
            for name in self.names():
                if name not in wanted:
                    continue
                if name in mods:
                    m = mods[name]
                    yield name, (m.ternary_codes().to(torch.int8).cpu(), m.weight_scale.float().cpu())
                elif name == DERIVED_LB:
                    yield name, derived_lower_bounds(tensors["model.lower_bounds"])
                else:
                    yield name, tensors[name].detach().cpu()
            return
        need = set(wanted)
        if DERIVED_LB in need:
            need.add("model.lower_bounds")
        if self.tied_head and "lm_head.weight" in need:
            need.add("model.embeddings.weight")
        from mmf.checkpoint import iter_tensors

        for name, t in iter_tensors(self.path, need):
            if name == "model.embeddings.weight" and self.tied_head and "lm_head.weight" in wanted:
                yield "lm_head.weight", weight_quant(t)
            if name == "model.lower_bounds" and DERIVED_LB in wanted:
                yield DERIVED_LB, derived_lower_bounds(t)
            if name not in wanted:
                continue
            yield name, (weight_quant(t) if is_ternary_name(name) else t)


def derived_lower_bounds(lower_bounds: torch.Tensor) -> torch.Tensor:
    """The lower bound each layer's forget gate uses: softmax over layers, cumsum, minus row 0 (row 0 is 0)."""
    lb = lower_bounds.float().softmax(0)
    return lb.cumsum(0) - lb[0]
