"""Sampling: greedy, temperature, top-k, top-p; streams text as it is produced.

The MatMul-free model decodes with its O(1) recurrent state, Transformer++ with its KV cache;
both through the same ``model(input_ids, cache)`` call. With ``graph=True`` (``mmf generate
--graph``) each decode step is instead one CUDA-graph replay of a static decoder: for a MatMul-free
model ``mmf.decode_graph.GraphDecoder`` (the fused Triton kernels on the packed weights; the first
build on a machine compiles and tunes them, tens of seconds, and keeps the schedules on disk), for
Transformer++ ``mmf.llama_static.StaticLlama`` (static KV cache sized for prompt and new tokens). Same
tokens as the eager path up to rounding flips of the activation quantiser (docs/reference-semantics.md);
sampling runs on the host from the logits either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .devices import resolve_device
from .errors import CheckpointError, MMFError
from .tokenizer import check_tokenizer_fits


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Refuse out-of-range sampling options with one line each (before anything is loaded)."""
    if max_new_tokens < 0:
        raise MMFError(f"--max-new-tokens {max_new_tokens}: must be >= 0 (the number of tokens to generate)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MMFError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy, 1 = the model's "
                       "own distribution)")
    if top_k < 0:
        raise MMFError(f"--top-k {top_k}: must be >= 0 (0 keeps every token, k keeps the k most likely)")
    if not 0 < top_p <= 1:
        raise MMFError(f"--top-p {top_p}: must be in (0, 1] (1 = off, 0.9 keeps the most likely tokens holding 90 % "
                       "of the probability)")


def check_prompt_ids(prompt_ids: list[int], vocab_size: Optional[int]) -> None:
    """The tokenised prompt must be non-empty and inside the model's vocabulary."""
    if not prompt_ids:
        raise MMFError("the prompt is empty after tokenisation; give some text with --prompt")
    if vocab_size is not None and max(prompt_ids) >= vocab_size:
        raise MMFError(f"the tokenizer produced id {max(prompt_ids)} but the model's vocabulary has {vocab_size} "
                       "entries; the checkpoint's tokenizer does not match its config")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:  # check_sampling keeps it in (0, 1]
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _StaticSteps:
    """``model(ids, cache)``-shaped calls on a static decoder: the first call prefills the prompt,
    each later one feeds one token and replays the decode step (a CUDA graph on a GPU)."""

    def __init__(self, model, prompt_len: int, max_new_tokens: int):
        self.config = model.config
        if getattr(model, "arch", None) == "mmf":
            from .decode_graph import GraphDecoder

            self.dec, self.llama = GraphDecoder(model, batch=1), False
        else:
            from .llama_static import StaticLlama

            self.dec = StaticLlama.from_model(model).setup(batch=1, max_len=prompt_len + max_new_tokens + 1)
            self.llama = True

    def __call__(self, ids: torch.Tensor, cache=None):
        if cache is None:  # the prompt
            logits = self.dec.prefill(ids)
            if self.llama:  # StaticLlama's prefill returns its greedy pick; the logits stay in .logits
                logits = self.dec.logits
        elif self.llama:
            self.dec.tok.copy_(ids.reshape(-1))  # the sampled token replaces the step's own greedy pick
            self.dec.step()
            logits = self.dec.logits
        else:
            logits = self.dec.step(ids.reshape(-1))
        return SimpleNamespace(logits=logits[:, None], cache=True)


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None,
                 on_token: Optional[Callable[[int], None]] = None, device="cpu", graph: bool = False,
                 vocab_limit: Optional[int] = None) -> list[int]:
    """Prefill the prompt in one call, then decode one token at a time with the model's cache (with
    ``graph``, a static decoder's: see the module doc). ``vocab_limit``: only ids below it are sampled."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_prompt_ids(prompt_ids, getattr(model.config, "vocab_size", None))
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if graph:
        model = _StaticSteps(model, len(prompt_ids), max_new_tokens)
    out = model(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :vocab_limit].float().cpu()  # ids past the tokenizer's are never sampled
        nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if (eos_id is not None and nxt == eos_id) or len(new) == max_new_tokens:
            break  # no forward pass for a token whose successor is not wanted
        out = model(torch.tensor([[nxt]], dtype=torch.long, device=device), out.cache)
    return new


def run_generate(checkpoint: Optional[Path] = None, onnx: Optional[Path] = None, prompt: Optional[str] = None,
                 prompt_file: Optional[Path] = None, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, device: str = "cpu",
                 dtype: Optional[str] = None, graph: bool = False,
                 write: Optional[Callable[[str], None]] = None, threads: Optional[int] = None) -> str:
    """`mmf generate`: from a CHECKPOINT or an ``--onnx`` export (exactly one), the prompt from ``prompt`` or
    ``prompt_file``. Every option is checked and the model and tokenizer are loaded before anything is
    written, so a failed call leaves no output; then the prompt and the generated text stream to ``write``.
    Returns the generated text (without the prompt). ``dtype`` None: fp32, or the export's own dtype.
    ``threads``: CPU threads for torch, the native CPU kernel and ONNX Runtime (None: torch's default)."""
    from .devices import set_threads
    from .onnx_runtime import onnx_source

    onnx = onnx_source(checkpoint, onnx)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    set_threads(threads)
    if onnx is not None:
        if graph:
            raise MMFError("--graph and --onnx do not go together: ONNX Runtime runs its own graph; drop one")
        if str(device).strip().lower() not in ("cpu", "auto"):
            raise MMFError(f"--device {device} does not apply to --onnx: mmf runs exports on ONNX Runtime's CPU "
                           "provider; drop --device, or give the CHECKPOINT instead of --onnx to run it on a GPU")
        text = read_prompt(prompt, prompt_file)
        return generate_onnx_text(onnx, text, max_new_tokens, temperature, top_k, top_p, seed, write,
                                  dtype=dtype, echo_prompt=True, threads=threads or 0)
    text = read_prompt(prompt, prompt_file)
    return generate_text(checkpoint, text, max_new_tokens, temperature, top_k, top_p, seed, device, dtype or "fp32",
                         write, graph, echo_prompt=True)


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt of `mmf generate`: ``--prompt TEXT`` or the UTF-8 text of ``--prompt-file PATH``."""
    if prompt_file is not None:
        if prompt is not None:
            raise MMFError("give either --prompt or --prompt-file, not both")
        try:
            return Path(prompt_file).read_bytes().decode("utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise MMFError(f"{prompt_file}: no such prompt file") from None
        except UnicodeDecodeError as e:
            raise MMFError(f"{prompt_file}: not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None
    if prompt is None:
        raise MMFError("no prompt: pass --prompt TEXT or --prompt-file PATH")
    return prompt


def generate_text(checkpoint, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
                  top_p: float = 1.0, seed: Optional[int] = None, device: str = "cpu", dtype="fp32",
                  write: Optional[Callable[[str], None]] = None, graph: bool = False,
                  echo_prompt: bool = False) -> str:
    """Check the options, load ``checkpoint`` and its tokenizer, generate, and stream the text to ``write``
    (preceded by the prompt with ``echo_prompt``, once everything has loaded). Returns the generated text."""
    from .checkpoint import load_model, parse_dtype
    from .tokenizer import load_tokenizer

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = resolve_device(device)
    if graph and device.type != "cuda":
        raise MMFError("--graph replays CUDA graphs: it needs --device cuda (drop --graph on the CPU)")
    parse_dtype(dtype)
    model = load_model(checkpoint, device=device, dtype=dtype, frozen=True)
    tok = load_tokenizer(checkpoint, model.config.bos_token_id, model.config.eos_token_id)
    return stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, device, write, graph,
                       echo_prompt)


def generate_onnx_text(directory, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
                       top_p: float = 1.0, seed: Optional[int] = None,
                       write: Optional[Callable[[str], None]] = None, fold_constants: bool = True,
                       dtype: Optional[str] = None, echo_prompt: bool = False, threads: int = 0) -> str:
    """`mmf generate --onnx DIR`: check the options, load the export and its tokenizer, then generate through
    ONNX Runtime (after writing the prompt with ``echo_prompt``). ``dtype``, if given, must be the export's
    own (fp32 or fp16, fixed by `mmf export-onnx --dtype`). ``threads``: ONNX Runtime's intra-op threads
    (0: its default)."""
    from .onnx_runtime import OnnxCausalLM, read_manifest
    from .tokenizer import load_tokenizer

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    manifest = read_manifest(directory)
    if dtype is not None and dtype != manifest["dtype"]:
        raise MMFError(f"--dtype {dtype}: {directory} was exported in {manifest['dtype']} and ONNX Runtime runs it so; "
                       f"drop --dtype, or re-export with `mmf export-onnx --dtype {dtype}`")
    model = OnnxCausalLM(directory, fold_constants=fold_constants, threads=threads)
    cfg = model.config
    try:
        tok = load_tokenizer(directory, cfg.bos_token_id, cfg.eos_token_id)
    except CheckpointError:
        raise CheckpointError(f"{directory}: the export has no tokenizer (its checkpoint had none); copy the model's "
                              "tokenizer.json into it") from None
    return stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, "cpu", write,
                       echo_prompt=echo_prompt)


def stream_text(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: Optional[int], device, write: Optional[Callable[[str], None]], graph: bool = False,
                echo_prompt: bool = False) -> str:
    """Tokenise ``prompt``, generate with ``model`` (torch or ONNX Runtime) and stream the decoded text
    (after the prompt itself with ``echo_prompt``, once the prompt's ids are known to be valid)."""
    check_tokenizer_fits(tok, getattr(model.config, "vocab_size", None))
    prompt_ids = tok.encode(prompt)
    if tok.bos_id is not None and getattr(tok, "kind", "") == "hf":
        prompt_ids = [tok.bos_id] + prompt_ids
    check_prompt_ids(prompt_ids, getattr(model.config, "vocab_size", None))
    feed = tok.stream_decoder()
    pieces: list[str] = []

    def on_token(t: int) -> None:
        s = feed(t)
        if s:
            pieces.append(s)
            if write is not None:
                write(s)

    if graph:  # built (compiled and tuned) before the prompt is written: a failure here leaves no output
        model = _StaticSteps(model, len(prompt_ids), max_new_tokens)
    if echo_prompt and write is not None:
        write(prompt)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    # a model's vocabulary may be larger than its tokenizer's (padded embedding tables): sample only ids the
    # tokenizer can turn back into text
    generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos, on_token, device,
                 vocab_limit=tok.vocab_size)
    return "".join(pieces)
