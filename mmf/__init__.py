"""mmf: MatMul-free language models (ternary BitLinear + MLGRU) and a Transformer++ baseline.

Stable Python API::

    import mmf
    model = mmf.load_model("ckpt", device="cpu", dtype=torch.float32)
    out = model(input_ids)                 # out.logits (B, T, V), out.cache
    out = model(next_ids, cache=out.cache) # continues the sequence
"""

__version__ = "0.1.0"

from .checkpoint import load_model, save_checkpoint  # noqa: E402
from .config import LlamaConfig, MMFConfig, model_preset, resolve_model_config  # noqa: E402
from .errors import MMFError  # noqa: E402
from .models import build_model  # noqa: E402
from .tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

__all__ = ["ByteTokenizer", "LlamaConfig", "MMFConfig", "MMFError", "build_model", "load_model", "load_tokenizer",
           "model_preset", "resolve_model_config", "save_checkpoint", "__version__"]
