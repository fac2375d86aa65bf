"""``mmf eval``: loss and perplexity of a checkpoint on text, JSONL or a directory of them.

The data is tokenised with the checkpoint's own tokenizer into a temporary token file (streamed,
as for training; nothing is written beside the checkpoint), then scored in non-overlapping
windows of ``seq_len`` tokens, each window scored from an empty state.

On the CPU a MatMul-free checkpoint is scored in its inference form (``load_model(frozen=True)``, as
`mmf generate` runs it), so its BitLinears run the native CPU kernel: the same arithmetic as the
training form, whose integer products are exact in both, up to the order of the fp32 operations
(docs/reference-semantics.md: a rounding flip of the activation quantiser now and then; the loss
agrees to about 1e-5 relative). On a GPU the training form is scored, through its fused kernels.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_config, load_model
from .data import TOKENS_FILE, encode_pieces, iter_documents, resolve_files
from .errors import MMFError
from .tokenizer import ByteTokenizer, check_tokenizer_fits, has_tokenizer, missing_tokenizer_error


def evaluate_checkpoint(checkpoint: Path, data: list[str], seq_len: int = 512, batch_size: int = 8,
                        max_tokens: Optional[int] = None, device: str = "cpu", dtype: str = "fp32",
                        text_field: str = "text", threads: Optional[int] = None) -> dict:
    """Mean next-token loss (nats/token), perplexity and bits per byte of ``checkpoint`` on ``data`` (with
    ``max_tokens``, of its first ``max_tokens`` scored tokens, bits per byte over the text they cover).
    ``threads``: CPU threads (``torch.set_num_threads``; None keeps torch's default)."""
    from .data import load_saved_tokenizer
    from .devices import resolve_device, set_threads

    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)  # one clear error for a missing or broken checkpoint
    if seq_len < 2 or batch_size < 1:
        raise MMFError("--seq-len must be >= 2 and --batch-size >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise MMFError(f"--max-tokens {max_tokens}: give a positive number of tokens to score, "
                       "or leave it out to score all the data")
    dev = resolve_device(device)
    set_threads(threads)
    files = resolve_files(data, "evaluation")
    if not has_tokenizer(checkpoint):
        raise missing_tokenizer_error(checkpoint)
    tokenizer = load_saved_tokenizer(checkpoint)
    check_tokenizer_fits(tokenizer, cfg.vocab_size, checkpoint)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mmf-eval-") as tmp:
        path = Path(tmp) / TOKENS_FILE
        n = 0
        n_bytes = 0  # of the text the tokens kept (the first max_tokens + 1) spell
        pieces = (piece for file in files for piece in iter_documents(file, text_field, "--text-field"))
        with open(path, "wb") as f:
            for piece in pieces:
                ids = encode_pieces(tokenizer, [piece]).astype(np.int64)
                keep = ids.size if max_tokens is None else min(ids.size, max_tokens + 1 - n)
                n_bytes += len(piece[0].encode("utf-8")) if keep == ids.size else _text_bytes(tokenizer, ids[:keep])
                ids.tofile(f)
                n += ids.size
                if max_tokens is not None and n >= max_tokens + 1:
                    break
        if n < 2:
            raise MMFError(f"the evaluation data holds no text ({', '.join(data[:3])}); give non-empty files")
        tokens = np.memmap(path, dtype=np.int64, mode="r", shape=(n,))
        if max_tokens is not None:
            tokens = tokens[:max_tokens + 1]
        model = load_model(checkpoint, device=dev, dtype=dtype, frozen=dev.type == "cpu")
        vocab = model.config.vocab_size
        if int(tokens.max()) >= vocab:
            raise MMFError(f"{checkpoint}: its tokenizer produced id {int(tokens.max())} >= the model's vocab {vocab}; "
                           "the checkpoint's tokenizer does not match its config")
        L = min(seq_len, len(tokens) - 1)
        starts = list(range(0, len(tokens) - 1, L))
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(starts), batch_size):
                rows = [np.asarray(tokens[s:s + L + 1]) for s in starts[i:i + batch_size]]
                full = [r for r in rows if len(r) == L + 1]  # the last window may be shorter: scored alone
                short = [r for r in rows if len(r) != L + 1 and len(r) > 1]
                for group in ([np.stack(full)] if full else []) + [r[None] for r in short]:
                    x = torch.from_numpy(np.array(group, dtype=np.int64)).to(dev)  # a writable copy
                    logits = model(x[:, :-1]).logits.float()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
                    total += float(loss)
                    count += x[:, 1:].numel()
        del tokens
    loss = total / count
    result = {
        "checkpoint": str(checkpoint), "arch": model.config.arch, "tokens": count, "loss": loss,
        "perplexity": math.exp(min(loss, 700)), "seq_len": L, "seconds": round(time.time() - t0, 3),
    }
    if n_bytes:  # with max_tokens: over the bytes of the text that the scored tokens cover
        result["bits_per_byte"] = total / math.log(2) / n_bytes
    return result


def _text_bytes(tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text that ``ids``, the start of a document piece's tokens, spell (bos/eos spell none):
    exact for the byte tokenizer; otherwise the decoded text's, where a character cut by the end counts whole."""
    if isinstance(tokenizer, ByteTokenizer):
        return int((ids >= tokenizer.offset).sum())
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))
