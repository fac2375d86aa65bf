"""Model configs: dataclasses with strict validation, loadable from TOML and from Hugging Face `config.json`.

Two architectures share one config system:

* ``MMFConfig`` (``model_type = "hgrn_bit"``): the MatMul-free LM, field names as in the published
  MMfreeLM ``config.json`` so checkpoints move both ways with no conversion step;
* ``LlamaConfig`` (``model_type = "llama"``): the Transformer++ baseline, Hugging Face Llama fields.

Presets (``tiny``, ``370m``, ``1.3b``, ``2.7b``, ``13b``) exist for both; a preset name is ``SIZE``
(MatMul-free) or ``ARCH-SIZE`` with ARCH ``mmf`` or ``transformer++``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Optional, Union

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# ---------------------------------------------------------------------------------------------
# Hugging Face config.json keys: two tables, read by `model_config_from_dict` and nowhere else.
# ---------------------------------------------------------------------------------------------

# Keys that say nothing about the model's arithmetic, dropped on load: every generic
# ``PretrainedConfig`` attribute that transformers 4.x and 5.x write (a full ``to_dict()`` or
# ``to_json_file(use_diff=False)``), and the inert keys of the HGRNBit and Llama configs. Keys that
# are fields of ``MMFConfig`` / ``LlamaConfig`` (token ids, ``tie_word_embeddings``, ...) are read as fields.
HF_INERT_KEYS = frozenset({
    # bookkeeping and provenance
    "_name_or_path", "name_or_path", "_commit_hash", "architectures", "transformers_version", "auto_map",
    "custom_pipelines", "tokenizer_class", "finetuning_task", "task_specific_params", "prefix",
    "mmf_version", "generation_config",
    # storage dtype (mmf computes in the dtype it is asked for)
    "dtype", "torch_dtype", "use_bfloat16",
    # what forward returns, and kernel choices with the same maths
    "return_dict", "output_hidden_states", "output_attentions", "_output_attentions", "use_cache", "torchscript",
    "attn_implementation", "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset",
    "experts_implementation", "_experts_implementation", "_experts_implementation_internal",
    "chunk_size_feed_forward", "pretraining_tp", "fuse_cross_entropy", "fuse_norm", "fuse_swiglu",
    "gradient_checkpointing",
    # heads and structure flags that a causal LM's forward does not read
    "id2label", "label2id", "num_labels", "problem_type", "is_encoder_decoder", "is_decoder",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size", "sep_token_id",
    "decoder_start_token_id", "tf_legacy_loss",
    # training-only settings
    "initializer_range", "attention_dropout",
    # generation defaults (mmf generate takes its own options)
    "max_length", "min_length", "max_new_tokens", "min_new_tokens", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
})


def _rope_type(value) -> str:
    return str(value.get("rope_type", value.get("type", "default"))) if isinstance(value, dict) else "default"


# Settings that change the arithmetic: (model types or None for both, key, accepted(value), what mmf
# supports). A value outside is refused with one line naming the key, its value and what mmf supports.
# Absent keys are never checked.
UNSUPPORTED_SETTINGS = (
    (None, "quantization_config",
     lambda v: v is None or (isinstance(v, dict) and v.get("quant_method") == "mmf_ternary"),
     "no quantisation, or the packed formats `mmf pack` writes (quant_method 'mmf_ternary'); "
     "load the unquantised checkpoint"),
    (None, "pruned_heads", lambda v: not v, "no pruned heads ({})"),
    (None, "per_layer_config", lambda v: not v, "the same settings in every layer (null)"),
    (("hgrn_bit",), "use_short_conv", lambda v: v is False,
     "false (no short convolution; the released MMfreeLM models use none)"),
    (("hgrn_bit",), "expand_ratio", lambda v: v == 1 and v is not True, "1 (the released models' value)"),
    (("hgrn_bit",), "hidden_act", lambda v: v in ("swish", "silu"), "'swish' (silu)"),
    (("llama",), "hidden_act", lambda v: v in ("silu", "swish"), "'silu' (SwiGLU)"),
    (("llama",), "rope_scaling", lambda v: _rope_type(v) == "default", "null or rope_type 'default' (plain RoPE)"),
    (("llama",), "rope_parameters", lambda v: _rope_type(v) == "default", "null or rope_type 'default' (plain RoPE)"),
)


def check_supported(data: dict, model_type: str, where: str) -> None:
    """Refuse the first setting of ``data`` that changes the arithmetic in a way mmf does not implement."""
    for types_, key, accepted, supported in UNSUPPORTED_SETTINGS:
        if key in data and (types_ is None or model_type in types_) and not accepted(data[key]):
            raise ConfigError(f"{where}: {key} = {_show(data[key])} is not supported; mmf supports {supported}")


def _show(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is Any:
        return True
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def dataclass_from_dict(cls, data: dict, where: str, ignore: frozenset = frozenset()):
    """Build dataclass ``cls`` from ``data``: unknown keys and ill-typed values are errors.

    ``where`` names the source (a file or section) in the error message; keys in ``ignore`` are
    accepted and dropped.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}'; valid keys: {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            value = dataclass_from_dict(tp, value, f"{where} [{key}]")
        elif not _type_ok(value, tp):
            raise ConfigError(
                f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            )
        elif tp is float or (typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp)):
            value = float(value) if isinstance(value, int) else value
        kwargs[key] = value
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{where}: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def default_intermediate_size(hidden_size: int, hidden_ratio: int = 4) -> int:
    """The released code's rule (``HGRNBitMLP``): ``int(d * hidden_ratio * 2/3)`` rounded up to a multiple of 256.
    It is ``256 * ceil(d * hidden_ratio * 2/3 / 256)`` except where d * hidden_ratio * 2/3 lies strictly between
    256 k and 256 k + 1 (the truncation comes first: d 55, ratio 7 gives 256, not 512)."""
    return 256 * ((int(hidden_size * hidden_ratio * 2 / 3) + 255) // 256)


def check_eps(eps: float, where: str) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"{where}: rms_norm_eps must be a positive number, got {eps}")


@dataclass
class MMFConfig:
    """The MatMul-free LM (HGRNBit). Field names follow the published ``config.json``."""

    model_type: str = "hgrn_bit"
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    intermediate_size: Optional[int] = None
    hidden_ratio: int = 4
    rms_norm_eps: float = 1e-6
    use_lower_bound: bool = True
    num_heads: int = 1
    expand_ratio: int = 1
    use_short_conv: bool = False
    conv_size: int = 4
    share_conv_kernel: bool = True
    attn_mode: str = "fused_recurrent"
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list[int]]] = 2
    pad_token_id: Optional[int] = None
    # Keys of a config.json that mmf read past (not settings of this model): see model_config_from_dict.
    ignored_keys: ClassVar[Mapping] = MappingProxyType({})

    @property
    def arch(self) -> str:
        return "mmf"

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or default_intermediate_size(self.hidden_size, self.hidden_ratio)

    def validate(self, where: str = "config") -> None:
        if self.model_type != "hgrn_bit":
            raise ConfigError(f"{where}: model_type must be 'hgrn_bit' for the MatMul-free model")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "hidden_ratio", "num_heads", "conv_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"{where}: intermediate_size must be positive or null")
        check_eps(self.rms_norm_eps, where)
        check_supported(dataclasses.asdict(self), self.model_type, where)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["intermediate_size"] = self.ffn_size  # explicit: the released code and mmf then agree without a rule
        d["architectures"] = ["HGRNBitForCausalLM"]
        return d


@dataclass
class LlamaConfig:
    """Transformer++ (Llama recipe). Field names follow Hugging Face's ``LlamaConfig``."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: Optional[int] = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list[int]]] = 2
    pad_token_id: Optional[int] = None
    ignored_keys: ClassVar[Mapping] = MappingProxyType({})

    @property
    def arch(self) -> str:
        return "transformer++"

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or default_intermediate_size(self.hidden_size, 4)

    @property
    def n_kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def dim_head(self) -> int:
        return self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim

    @property
    def theta(self) -> float:
        """RoPE's base: a ``rope_theta`` in ``rope_scaling`` (which transformers 5 lets override
        ``rope_parameters``), else in ``rope_parameters``, else the top-level one."""
        for rp in (self.rope_scaling, self.rope_parameters):
            if isinstance(rp, dict) and rp.get("rope_theta") is not None:
                return float(rp["rope_theta"])
        return float(self.rope_theta)

    def validate(self, where: str = "config") -> None:
        if self.model_type != "llama":
            raise ConfigError(f"{where}: model_type must be 'llama' for Transformer++")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        for name in ("intermediate_size", "num_key_value_heads", "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive or null, got {getattr(self, name)}")
        check_eps(self.rms_norm_eps, where)
        if not (math.isfinite(self.attention_dropout) and 0 <= self.attention_dropout < 1):
            raise ConfigError(f"{where}: attention_dropout must be a number in [0, 1), got {self.attention_dropout}")
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise ConfigError(f"{where}: rope_theta must be a positive number, got {self.theta}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.n_kv_heads:
            raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.dim_head % 2:
            raise ConfigError(f"{where}: the head dimension must be even for rotary embeddings")
        check_supported(dataclasses.asdict(self), self.model_type, where)

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["intermediate_size"] = self.ffn_size
        d["architectures"] = ["LlamaForCausalLM"]
        return d


ModelConfig = Union[MMFConfig, LlamaConfig]
ARCHS = {"mmf": MMFConfig, "transformer++": LlamaConfig}
MODEL_TYPES = {"hgrn_bit": MMFConfig, "llama": LlamaConfig}

# Sizes: same d, L and vocab for both architectures. 13B uses the Llama-13B shape.
# tiny is the byte-level model that trains on 2 CPU cores in minutes.
_SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, vocab_size=259, heads=4, bos=1, eos=2),
    "370m": dict(hidden_size=1024, num_hidden_layers=24, vocab_size=32000, heads=16, bos=1, eos=2),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, vocab_size=32000, heads=32, bos=1, eos=2),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, vocab_size=32000, heads=40, bos=1, eos=2),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, vocab_size=32000, heads=40, bos=1, eos=2),
}
SIZES = tuple(_SIZES)


def preset_names() -> list[str]:
    return [f"{a}-{s}" for a in ARCHS for s in _SIZES]


def split_preset(name: str) -> tuple[str, str]:
    """``'370m'`` -> ``('mmf', '370m')``; ``'transformer++-13b'`` -> ``('transformer++', '13b')``."""
    for arch in ARCHS:
        if name.startswith(arch + "-"):
            return arch, name[len(arch) + 1:]
    return "mmf", name


def model_preset(name: str) -> ModelConfig:
    """The model config of a preset (heads: d / 64 for Transformer++, Llama-13B uses d / 128)."""
    arch, size = split_preset(name)
    if size not in _SIZES:
        raise ConfigError(
            f"unknown preset '{name}'; valid presets: {', '.join(list(_SIZES) + preset_names())}"
        )
    s = _SIZES[size]
    if arch == "mmf":
        return MMFConfig(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
            bos_token_id=s["bos"], eos_token_id=s["eos"],
        )
    return LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        intermediate_size=default_intermediate_size(s["hidden_size"], 4), rms_norm_eps=1e-6,
        bos_token_id=s["bos"], eos_token_id=s["eos"],
    )


def model_config_from_dict(data: dict, where: str, hf: bool = False) -> ModelConfig:
    """Pick the architecture from ``model_type`` (or ``arch``) and validate.

    Settings in ``UNSUPPORTED_SETTINGS`` are refused either way. A Hugging Face ``config.json``
    (``hf=True``) is read as transformers reads it: keys in ``HF_INERT_KEYS`` are dropped and any other
    unknown key is accepted, kept in the config's ``ignored_keys``, and named on stderr when spelled like
    a field (a likely typo whose setting would otherwise be lost silently). mmf's own configs
    (``hf=False``: a TOML ``[model]`` table) are strict: an inert key is an unknown key like any other, and
    ``attention_dropout`` must be 0.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings")
    data = dict(data)
    arch = data.pop("arch", None)
    mt = data.get("model_type")
    if mt is None and arch is not None:
        if arch not in ARCHS:
            raise ConfigError(f"{where}: unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
        mt = ARCHS[arch]().model_type
        data["model_type"] = mt
    if mt not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {mt!r} is not supported; valid: {', '.join(MODEL_TYPES)} "
            "(set model_type or arch = 'mmf' | 'transformer++')"
        )
    cls = MODEL_TYPES[mt]
    if hf and mt == "hgrn_bit":
        released_hgrn_bit_values(data, where)
    check_supported(data, mt, where)
    fields = {f.name for f in dataclasses.fields(cls)}
    checked = {key for _, key, _, _ in UNSUPPORTED_SETTINGS}
    ignored = {}
    for key in list(data):
        if key in fields:
            continue
        if (hf and key in HF_INERT_KEYS) or key in checked:
            del data[key]
        elif hf:
            ignored[key] = data.pop(key)
    cfg = dataclass_from_dict(cls, data, where)
    if not hf and getattr(cfg, "attention_dropout", 0.0):
        raise ConfigError(f"{where}: attention_dropout = {cfg.attention_dropout} is not supported; "
                          "mmf applies no dropout (0.0)")
    cfg.ignored_keys = MappingProxyType(ignored)
    for key in ignored:
        near = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
        if near:
            _warn_once(f"{where}: key '{key}' is not a {mt} setting and is ignored (did you mean '{near[0]}'?)")
    return cfg


def released_hgrn_bit_values(data: dict, where: str) -> None:
    """Values of a published hgrn_bit ``config.json`` that the released code reads as mmf's defaults (in place):
    ``hidden_ratio`` null is 4 and 4.0 is 4; ``hidden_act`` is never applied (``HGRNBitMLP.forward`` always
    computes swiglu), so another activation's name changes nothing and is read as swish, with a warning."""
    hr = data.get("hidden_ratio")
    if "hidden_ratio" in data and hr is None:
        data["hidden_ratio"] = 4
    elif isinstance(hr, float) and hr.is_integer():
        data["hidden_ratio"] = int(hr)
    act = data.get("hidden_act")
    if isinstance(act, str) and act not in ("swish", "silu"):
        _warn_once(f"{where}: hidden_act {act!r} is not used by hgrn_bit (the released HGRNBitMLP always applies "
                   "swiglu); read as 'swish'")
        data["hidden_act"] = "swish"


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        sys.stderr.write(f"mmf: warning: {message}\n")


def load_hf_config(path: Path) -> ModelConfig:
    """Load a Hugging Face style ``config.json`` (hgrn_bit or llama), as transformers reads it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; a checkpoint directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; a checkpoint's config.json is a file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    return model_config_from_dict(data, str(path), hf=True)


def load_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name, a TOML file (a ``[model]`` table or top-level keys) or a config.json."""
    p = Path(spec)
    if p.suffix == ".toml" or (p.exists() and p.is_file() and p.suffix != ".json"):
        data = load_toml(p)
        return model_config_from_dict(data.get("model", data), f"{p} [model]")
    if p.suffix == ".json" or (p.is_dir() and (p / "config.json").exists()):
        return load_hf_config(p / "config.json" if p.is_dir() else p)
    return model_preset(spec)
