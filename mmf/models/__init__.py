"""Model classes of both architectures and the factory that builds one from a config."""

from mmf.config import LlamaConfig, MMFConfig

from .common import ModelOutput
from .hgrn_bit import BitLinear, FrozenBitLinear, HGRNBitForCausalLM, RecurrentCache
from .llama import KVCache, LlamaForCausalLM


def build_model(cfg):
    """An untrained model of ``cfg``'s architecture (parameters uninitialised; call ``init_weights``)."""
    if isinstance(cfg, MMFConfig):
        return HGRNBitForCausalLM(cfg)
    if isinstance(cfg, LlamaConfig):
        return LlamaForCausalLM(cfg)
    raise TypeError(f"not a model config: {type(cfg).__name__}")


__all__ = [
    "BitLinear", "FrozenBitLinear", "HGRNBitForCausalLM", "KVCache", "LlamaForCausalLM", "ModelOutput",
    "RecurrentCache", "build_model",
]
