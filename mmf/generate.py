"""Sampling: greedy, temperature, top-k, top-p; streams text as it is produced.

The MatMul-free model decodes with its O(1) recurrent state, Transformer++ with its KV cache;
both through the same ``model(input_ids, cache)`` call. With ``graph=True`` (``mmf generate
--graph``) each decode step is instead one CUDA-graph replay of a static decoder: for a MatMul-free
model ``mmf.decode_graph.GraphDecoder`` (the fused Triton kernels on the packed weights; the first
build on a machine compiles and tunes them, tens of seconds, and keeps the schedules on disk), for
Transformer++ ``mmf.llama_static.StaticLlama`` (static KV cache sized for prompt and new tokens). Same
tokens as the eager path up to rounding flips of the activation quantiser (reference-semantics.md);
sampling runs on the host from the logits either way.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .errors import MMFError


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
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
                 on_token: Optional[Callable[[int], None]] = None, device="cpu", graph: bool = False) -> list[int]:
    """Prefill the prompt in one call, then decode one token at a time with the model's cache (with
    ``graph``, a static decoder's: see the module doc)."""
    if not prompt_ids:
        raise MMFError("the prompt is empty after tokenisation; give some text with --prompt")
    if max_new_tokens < 0:
        raise MMFError("--max-new-tokens must be >= 0")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and max(prompt_ids) >= vocab:
        raise MMFError(f"the tokenizer produced id {max(prompt_ids)} but the model's vocabulary has {vocab} entries; "
                       "the checkpoint's tokenizer does not match its config")
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if graph:
        model = _StaticSteps(model, len(prompt_ids), max_new_tokens)
    out = model(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float().cpu()
        nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        out = model(torch.tensor([[nxt]], dtype=torch.long, device=device), out.cache)
    return new


def generate_text(checkpoint, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
                  top_p: float = 1.0, seed: Optional[int] = None, device: str = "cpu", dtype="fp32",
                  write: Optional[Callable[[str], None]] = None, graph: bool = False) -> str:
    """Load ``checkpoint`` and its tokenizer, generate, and stream the text to ``write``."""
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    if graph and torch.device(device).type != "cuda":
        raise MMFError("--graph replays CUDA graphs: it needs --device cuda (drop --graph on the CPU)")
    model = load_model(checkpoint, device=device, dtype=dtype, frozen=True)
    tok = load_tokenizer(checkpoint, model.config.bos_token_id, model.config.eos_token_id)
    return stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, device, write, graph)


def stream_text(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: Optional[int], device, write: Optional[Callable[[str], None]], graph: bool = False) -> str:
    """Tokenise ``prompt``, generate with ``model`` (torch or ONNX Runtime) and stream the decoded text."""
    prompt_ids = tok.encode(prompt)
    if tok.bos_id is not None and getattr(tok, "kind", "") == "hf":
        prompt_ids = [tok.bos_id] + prompt_ids
    feed = tok.stream_decoder()
    pieces: list[str] = []

    def on_token(t: int) -> None:
        s = feed(t)
        if s:
            pieces.append(s)
            if write is not None:
                write(s)

    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos, on_token, device, graph)
    return "".join(pieces)
