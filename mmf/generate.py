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

import json
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


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's largest seed


def check_seed(seed: Optional[int], prompts: int = 1) -> None:
    """``--seed S`` gives prompt i (from 1) the seed S + i - 1: all of them must be seeds torch takes."""
    if seed is None:
        return
    top = SEED_MAX - (prompts - 1)  # prompt i samples with S + i - 1
    if not 0 <= seed <= top:
        what = f" (prompt i takes S + i - 1, here up to S + {prompts - 1})" if prompts > 1 else ""
        raise MMFError(f"--seed {seed}: must be in 0..{top}{what}")


def check_prompt_ids(prompt_ids: list[int], vocab_size: Optional[int]) -> None:
    """The tokenised prompt must be non-empty and inside the model's vocabulary."""
    if not prompt_ids:
        raise MMFError("the prompt is empty after tokenisation; give some text with --prompt")
    if min(prompt_ids) < 0:
        raise MMFError(f"the prompt has the negative token id {min(prompt_ids)}; token ids start at 0")
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
                 top_p: float = 1.0, seed: Optional[int] = None, eos_id=None,
                 on_token: Optional[Callable[[int], None]] = None, device="cpu", graph: bool = False,
                 vocab_limit: Optional[int] = None) -> list[int]:
    """Prefill the prompt in one call, then decode one token at a time with the model's cache (with
    ``graph``, a static decoder's: see the module doc). ``vocab_limit``: only ids below it are sampled."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_prompt_ids(prompt_ids, getattr(model.config, "vocab_size", None))
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    stops = _stop_ids(eos_id)
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
        if nxt in stops or len(new) == max_new_tokens:
            break  # no forward pass for a token whose successor is not wanted
        out = model(torch.tensor([[nxt]], dtype=torch.long, device=device), out.cache)
    return new


def run_generate(checkpoint: Optional[Path] = None, onnx: Optional[Path] = None, prompt=None,
                 prompt_file: Optional[Path] = None, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, device: str = "cpu",
                 dtype: Optional[str] = None, graph: bool = False,
                 write: Optional[Callable[[str], None]] = None, threads: Optional[int] = None,
                 prompts_file: Optional[Path] = None, as_json: bool = False):
    """`mmf generate`: from a CHECKPOINT or an ``--onnx`` export (exactly one), the prompts from ``prompt`` (a
    string or a list: repeated ``--prompt``), ``prompt_file`` (the whole file, one prompt) or ``prompts_file``
    (one prompt per line) (``read_prompts``). Every option is checked and the model and tokenizer are loaded
    before anything is written, so a failed call leaves no output. One prompt: the prompt and the generated
    text stream to ``write``; returns the generated text (without the prompt). Several prompts are decoded as
    one batch (``generate_batch_ids``) and written once done, each under a ``=== prompt i of n ===`` line;
    returns the list of generated texts. ``as_json``: one JSON document instead (``batch_text``).
    ``dtype`` None: fp32, or the export's own dtype. ``threads``: CPU threads for torch, the native CPU kernel
    and ONNX Runtime (None: torch's default)."""
    from .devices import set_threads
    from .onnx_runtime import onnx_source

    onnx = onnx_source(checkpoint, onnx)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompts = read_prompts(prompt, prompt_file, prompts_file)
    check_seed(seed, len(prompts))
    set_threads(threads)
    if onnx is not None:
        if graph:
            raise MMFError("--graph and --onnx do not go together: ONNX Runtime runs its own graph; drop one")
        if str(device).strip().lower() not in ("cpu", "auto"):
            raise MMFError(f"--device {device} does not apply to --onnx: mmf runs exports on ONNX Runtime's CPU "
                           "provider; drop --device, or give the CHECKPOINT instead of --onnx to run it on a GPU")
        if len(prompts) == 1 and not as_json:
            return generate_onnx_text(onnx, prompts[0], max_new_tokens, temperature, top_k, top_p, seed, write,
                                      dtype=dtype, echo_prompt=True, threads=threads or 0)
        model, tok = load_onnx_for_generate(onnx, dtype=dtype, threads=threads or 0)
        dev = "cpu"
    else:
        if len(prompts) == 1 and not as_json:
            return generate_text(checkpoint, prompts[0], max_new_tokens, temperature, top_k, top_p, seed, device,
                                 dtype or "fp32", write, graph, echo_prompt=True)
        model, tok, dev = load_for_generate(checkpoint, device, dtype or "fp32", graph)
    doc = batch_text(model, tok, prompts, max_new_tokens, temperature, top_k, top_p, seed, dev, graph)
    if write is not None:
        write(json.dumps(doc, indent=2) if as_json else format_batch(doc))
    return [r["text"] for r in doc["results"]]


def _read_utf8(path, kind: str) -> str:
    """The UTF-8 text of ``--{kind}-file PATH``, or one line saying why it cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MMFError(f"{path}: no such {kind} file") from None
    except IsADirectoryError:
        raise MMFError(f"{path}: is a directory; --{kind}-file takes a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise MMFError(f"{path}: not UTF-8 text (byte {e.start}); convert it with iconv -t UTF-8") from None


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt of `mmf generate`: ``--prompt TEXT`` or the UTF-8 text of ``--prompt-file PATH``."""
    if prompt_file is not None:
        if prompt is not None:
            raise MMFError("give either --prompt or --prompt-file, not both")
        text = _read_utf8(prompt_file, "prompt")
        if not text.strip():  # as an empty --prompts-file: an error, not a generation from no prompt
            raise MMFError(f"--prompt-file {prompt_file}: no prompt in it (the file is "
                           f"{'empty' if not text else 'only whitespace'}); write the prompt into it or pass --prompt "
                           "TEXT")
        return text
    if prompt is None:
        raise MMFError("no prompt: pass --prompt TEXT or --prompt-file PATH")
    return prompt


def generate_text(checkpoint, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
                  top_p: float = 1.0, seed: Optional[int] = None, device: str = "cpu", dtype="fp32",
                  write: Optional[Callable[[str], None]] = None, graph: bool = False,
                  echo_prompt: bool = False) -> str:
    """Check the options, load ``checkpoint`` and its tokenizer, generate, and stream the text to ``write``
    (preceded by the prompt with ``echo_prompt``, once everything has loaded). Returns the generated text."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model, tok, device = load_for_generate(checkpoint, device, dtype, graph)
    return stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, device, write, graph,
                       echo_prompt)


def load_for_generate(checkpoint, device: str = "cpu", dtype="fp32", graph: bool = False):
    """(model, tokenizer, torch.device) of `mmf generate` from a checkpoint (frozen), after checking the device."""
    from .checkpoint import load_model, parse_dtype
    from .tokenizer import load_tokenizer

    device = resolve_device(device)
    if graph and device.type != "cuda":
        raise MMFError("--graph replays CUDA graphs: it needs --device cuda (drop --graph on the CPU)")
    parse_dtype(dtype)
    model = load_model(checkpoint, device=device, dtype=dtype, frozen=True)
    model.generation_eos = generation_config_eos(checkpoint)
    tok = load_tokenizer(checkpoint, model.config.bos_token_id, model.config.eos_token_id)
    return model, tok, device


def generate_onnx_text(directory, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
                       top_p: float = 1.0, seed: Optional[int] = None,
                       write: Optional[Callable[[str], None]] = None, fold_constants: bool = True,
                       dtype: Optional[str] = None, echo_prompt: bool = False, threads: int = 0) -> str:
    """`mmf generate --onnx DIR`: check the options, load the export and its tokenizer, then generate through
    ONNX Runtime (after writing the prompt with ``echo_prompt``). ``dtype``, if given, must be the export's
    own (fp32 or fp16, fixed by `mmf export-onnx --dtype`). ``threads``: ONNX Runtime's intra-op threads
    (0: its default)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model, tok = load_onnx_for_generate(directory, fold_constants, dtype, threads)
    return stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, "cpu", write,
                       echo_prompt=echo_prompt)


def load_onnx_for_generate(directory, fold_constants: bool = True, dtype: Optional[str] = None, threads: int = 0):
    """(model, tokenizer) of `mmf generate --onnx DIR`; ``dtype``, if given, must be the export's own."""
    from .onnx_runtime import OnnxCausalLM, read_manifest
    from .tokenizer import load_tokenizer

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
    return model, tok


def stream_text(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: Optional[int], device, write: Optional[Callable[[str], None]], graph: bool = False,
                echo_prompt: bool = False) -> str:
    """Tokenise ``prompt``, generate with ``model`` (torch or ONNX Runtime) and stream the decoded text
    (after the prompt itself with ``echo_prompt``, once the prompt's ids are known to be valid)."""
    prompt_ids = encode_prompt(model, tok, prompt)
    check_memory(model, [prompt_ids], max_new_tokens, graph, device)
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
    eos = end_tokens(model)
    # a model's vocabulary may be larger than its tokenizer's (padded embedding tables): sample only ids the
    # tokenizer can turn back into text
    generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos, on_token, device,
                 vocab_limit=tok.vocab_size)
    return "".join(pieces)


def end_tokens(model) -> tuple:
    """The ids generation stops at, as transformers' ``generate`` does: every id of config.json's
    ``eos_token_id`` (one or a list) and of the checkpoint's generation_config.json (``model.generation_eos``,
    set by ``load_for_generate``; Llama 3 Instruct lists its end-of-turn id only there)."""
    ids = _stop_ids(model.config.eos_token_id) + _stop_ids(getattr(model, "generation_eos", None))
    return tuple(dict.fromkeys(int(i) for i in ids))


def _stop_ids(eos_id) -> tuple:
    """``eos_id`` (None, an id, or several) as a tuple of ids."""
    if eos_id is None:
        return ()
    return tuple(eos_id) if isinstance(eos_id, (list, tuple, set, frozenset)) else (eos_id,)


def generation_config_eos(directory: Path):
    """``eos_token_id`` of ``directory/generation_config.json`` (an id or a list), or None without one. A file
    that is not JSON or holds no usable id is ignored, as transformers falls back to config.json then."""
    try:
        eos = json.loads((Path(directory) / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None

    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if ok(eos) or (isinstance(eos, list) and eos and all(ok(v) for v in eos)):
        return eos
    return None


def encode_prompt(model, tok, prompt: str) -> list[int]:
    """``prompt``'s ids (with the BOS of a Hugging Face tokenizer), checked against the model's vocabulary."""
    vocab = getattr(model.config, "vocab_size", None)
    check_tokenizer_fits(tok, vocab)
    prompt_ids = tok.encode(prompt)
    if tok.bos_id is not None and getattr(tok, "kind", "") == "hf":
        if tok.bos_id < 0 or (vocab is not None and tok.bos_id >= vocab):
            raise MMFError(f"config.json's bos_token_id {tok.bos_id} is not a token id of this model (0 to "
                           f"{vocab - 1 if vocab else '...'}); fix bos_token_id in the checkpoint's config.json")
        prompt_ids = [tok.bos_id] + prompt_ids
    check_prompt_ids(prompt_ids, getattr(model.config, "vocab_size", None))
    return prompt_ids


# ---------------------------------------------------------------------------------------------- several prompts
def read_prompts(prompts=None, prompt_file: Optional[Path] = None, prompts_file: Optional[Path] = None) -> list[str]:
    """The prompts of `mmf generate`: each ``--prompt TEXT`` (repeatable), then the lines of ``--prompts-file
    PATH`` (one prompt per line, UTF-8, blank lines skipped); or the whole of ``--prompt-file PATH`` as one
    prompt (as before, so it goes with neither of the others)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if prompt_file is not None:
        if prompts or prompts_file is not None:
            raise MMFError("--prompt-file reads its whole file as one prompt: give it alone, or use --prompts-file "
                           "(one prompt per line) with --prompt")
        return [read_prompt(None, prompt_file)]
    if prompts_file is not None:
        text = _read_utf8(prompts_file, "prompts")
        lines = [ln.rstrip("\r") for ln in text.split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise MMFError(f"--prompts-file {prompts_file}: no prompt in it (one prompt per line; blank lines are "
                           "skipped)")
        prompts += lines
    if not prompts:
        raise MMFError("no prompt: pass --prompt TEXT (repeatable), --prompt-file PATH or --prompts-file PATH")
    return prompts


def graph_batch_limit() -> int:
    """The largest batch a GraphDecoder takes."""
    from .decode_graph import GraphDecoder

    return GraphDecoder.MAX_BATCH


def decodes_as_batch(model) -> bool:
    """Does ``generate_batch_ids`` decode several prompts of ``model`` as one batch? A MatMul-free torch model
    does; Transformer++ and ONNX Runtime exports take the prompts one after another."""
    return getattr(model, "arch", None) == "mmf" and isinstance(model, torch.nn.Module)


def _row_generators(n: int, seed: Optional[int], first_row: int = 0) -> list:
    """One sampling generator per row: row i draws from ``seed + i`` (None: torch's global generator)."""
    if seed is None:
        return [None] * n
    return [torch.Generator(device="cpu").manual_seed(seed + first_row + i) for i in range(n)]


def _prefill_rows(model, prompts_ids: list, device):
    """Each prompt through the model on its own (exact per-row lengths: the MLGRU state is O(1), so no padding
    and no mask), then the rows stacked: last-position logits (B, V) and per-layer states (B, d)."""
    logits, states = [], None
    for ids in prompts_ids:
        out = model(torch.tensor([ids], dtype=torch.long, device=device))
        logits.append(out.logits[:, -1])
        st = out.cache.states
        states = [[s] for s in st] if states is None else [acc + [s] for acc, s in zip(states, st)]
    return torch.cat(logits, 0), [torch.cat(s, 0) for s in states]


@torch.inference_mode()
def generate_batch_ids(model, prompts_ids: list, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: Optional[int] = None, eos_id=None,
                       device="cpu", graph: bool = False, vocab_limit: Optional[int] = None,
                       on_token: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """Generate for several prompts at once; returns each row's new ids (stopped at ``eos_id``, included).

    A MatMul-free model decodes the prompts as one batch: each prompt is prefilled alone at its own length
    and the per-row recurrent states are stacked into the batch state (``_prefill_rows``), then every step
    feeds one token per row, through the model with a batched ``RecurrentCache`` or, with ``graph``, one
    CUDA-graph replay of one ``GraphDecoder(model, batch=B)`` (more prompts than its limit,
    ``graph_batch_limit()``, run in chunks of it; the last chunk is padded with copies of its first row,
    whose outputs are thrown away). A row that has finished is fed the first prompt's last token until every
    row has. Other models (Transformer++, whose KV caches of unequal lengths would need a mask; an ONNX Runtime
    export) generate the prompts one after another.

    Sampling: row i draws from its own generator seeded ``seed + i``, so with the same seed a row samples
    what ``generate_ids(model, prompt_i, seed=seed + i)`` does alone, up to rounding differences between the
    batched and the single-row kernels (greedy, ``temperature`` 0, needs no seed). ``on_token(row, id)`` is
    called for each new id."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    vocab = getattr(model.config, "vocab_size", None)
    for ids in prompts_ids:
        check_prompt_ids(ids, vocab)
    if not prompts_ids:
        return []
    if not decodes_as_batch(model):
        return [generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p,
                             None if seed is None else seed + i, eos_id,
                             None if on_token is None else (lambda t, i=i: on_token(i, t)), device, graph,
                             vocab_limit) for i, ids in enumerate(prompts_ids)]
    limit, dec = len(prompts_ids), None
    if graph and max_new_tokens > 1:  # one decoder for every chunk (the last one padded)
        from .decode_graph import GraphDecoder

        limit = min(limit, graph_batch_limit())
        dec = GraphDecoder(model, batch=limit)
    out: list = []
    for c in range(0, len(prompts_ids), limit):
        rows = prompts_ids[c:c + limit]
        cb = None if on_token is None else (lambda r, t, c=c: on_token(c + r, t))
        out += _generate_mmf_batch(model, rows, max_new_tokens, temperature, top_k, top_p,
                                   _row_generators(len(rows), seed, c), eos_id, device, dec, vocab_limit, cb)
    return out


def _set_decoder_state(dec, states: list) -> None:
    """Load per-layer (rows, d) states into a GraphDecoder's (L, batch, d) state; rows past ``len(states[0])``
    (padding) take row 0's."""
    s = torch.stack(states).to(device=dec.state.device, dtype=dec.state.dtype)
    if s.shape[1] < dec.state.shape[1]:
        s = torch.cat([s, s[:, :1].expand(-1, dec.state.shape[1] - s.shape[1], -1)], 1)
    if s.shape != dec.state.shape:
        raise MMFError(f"internal: states of shape {tuple(s.shape)} for a decoder state of {tuple(dec.state.shape)}")
    dec.state.copy_(s)


def _generate_mmf_batch(model, prompts_ids, max_new_tokens, temperature, top_k, top_p, gens, eos_id, device, dec,
                        vocab_limit, on_token) -> list[list[int]]:
    """One batch of ``generate_batch_ids`` (its doc); ``dec``: a GraphDecoder of at least this many rows, or
    None for the model's own batched step."""
    B = len(prompts_ids)
    new: list = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return new
    logits, states = _prefill_rows(model, prompts_ids, device)
    if dec is not None:
        _set_decoder_state(dec, states)
        pad = dec.batch - B

        def step(ids):
            if pad:
                ids = torch.cat([ids, ids[:1].expand(pad)])
            return dec.step(ids)[:B]
    else:
        from .models.hgrn_bit import RecurrentCache

        cache = RecurrentCache(states, 0)

        def step(ids):
            nonlocal cache
            o = model(ids[:, None], cache)
            cache = o.cache
            return o.logits[:, -1]

    done = [False] * B
    stops = _stop_ids(eos_id)
    filler = prompts_ids[0][-1]  # fed to finished rows (their outputs are thrown away): an id the model takes
    for t in range(max_new_tokens):
        lg = logits[:, :vocab_limit].float().cpu()
        if temperature <= 0:
            picks = lg.argmax(-1).tolist()
        else:
            picks = [int(sample_next(lg[i:i + 1], temperature, top_k, top_p, gens[i])[0]) for i in range(B)]
        for i, tok in enumerate(picks):
            if done[i]:
                continue
            new[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in stops:
                done[i] = True
        if all(done) or t + 1 == max_new_tokens:
            break  # no forward pass for tokens whose successors are not wanted
        feed = [filler if d else new[i][-1] for i, d in enumerate(done)]
        logits = step(torch.tensor(feed, dtype=torch.long, device=device))
    return new


def batch_rows(model, prompts: int, graph: bool) -> int:
    """Sequences ``generate_batch_ids`` decodes at once: every prompt (MatMul-free), a GraphDecoder's limit
    at most (``graph``), one for models that take the prompts one after another."""
    if not decodes_as_batch(model):
        return 1
    return min(prompts, graph_batch_limit()) if graph else prompts


def check_memory(model, prompts_ids: list, max_new_tokens: int, graph: bool, device) -> None:
    """Refuse in one line (``mmf.memory.check_generation_memory``) prompts whose batch would not fit beside the
    loaded weights, before a decoder is built or a prompt prefilled. ONNX Runtime exports are not checked."""
    from .memory import check_generation_memory, module_bytes
    from .models import FrozenBitLinear

    if not isinstance(model, torch.nn.Module):
        return
    weights = module_bytes(model)
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embeddings", None) or getattr(inner, "embed_tokens", None)
    act = emb.weight.element_size() if emb is not None else 4  # bytes of an activation (the embeddings' dtype)
    mmf = getattr(model, "arch", None) == "mmf"
    decoder = 0
    if graph and mmf:  # GraphDecoder packs int8 codes to 2 bits once more
        decoder = sum(m.out_features * -(-m.in_features // 4) for m in model.modules()
                      if isinstance(m, FrozenBitLinear) and getattr(m, "packed", None) is None)
    elif graph:  # StaticLlama copies the weights into its fused layout
        decoder = weights
    n = len(prompts_ids)
    rows = batch_rows(model, n, graph)
    fix = "" if mmf else " (Transformer++ takes them one after another: shorten the longest)"
    check_generation_memory(model.config, n, rows, max(len(p) for p in prompts_ids), max_new_tokens, act, device,
                            weights, decoder, fix=fix)


def batch_text(model, tok, prompts: list, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
               seed: Optional[int], device, graph: bool = False) -> dict:
    """Generate for every prompt as one batch (``generate_batch_ids``); returns a document: how it ran and, per
    prompt, its text, the generated text, the number of new tokens and whether it stopped at the end token."""
    ids = [encode_prompt(model, tok, p) for p in prompts]
    check_memory(model, ids, max_new_tokens, graph, device)
    eos = end_tokens(model)
    new = generate_batch_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos, device, graph,
                             vocab_limit=tok.vocab_size)
    results = []
    for p, row in zip(prompts, new):
        feed = tok.stream_decoder()
        results.append({"prompt": p, "text": "".join(feed(t) or "" for t in row), "new_tokens": len(row),
                        "stopped_at_eos": bool(row) and row[-1] in eos})
    how = "one prompt after another"
    if decodes_as_batch(model):
        how = "one batch, GraphDecoder (one CUDA graph per step)" if graph else "one batch, eager"
    return {"prompts": len(prompts), "batch": batch_rows(model, len(prompts), graph), "decode": how,
            "device": str(device), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
            "top_p": top_p, "seed": seed,
            "seeds": None if seed is None or temperature <= 0 else [seed + i for i in range(len(prompts))],
            "results": results}


def format_batch(doc: dict) -> str:
    """Each prompt and its generated text under a ``=== prompt i of n ===`` line."""
    n = doc["prompts"]
    return "\n".join(f"=== prompt {i} of {n} ===\n{r['prompt']}{r['text']}" for i, r in enumerate(doc["results"], 1))
