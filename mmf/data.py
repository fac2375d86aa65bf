"""Training data: text files, directories and JSONL, tokenised once into a memory-mapped token file.

The pipeline, in order:

1. ``resolve_files`` expands the inputs (files; directories of ``.txt``/``.md``/``.rst``/``.jsonl``,
   recursively, in sorted order) and fails with one line if any is missing or empty.
2. ``prepare_tokens`` tokenises every document once, streaming each file in bounded pieces (never
   the whole corpus as one string), into ``tokens.bin`` (uint16 when the vocabulary fits, else
   uint32) inside a cache directory named by a hash of the inputs' paths, sizes and modification
   times, the tokenizer settings and this format's version. An unchanged input reuses it.
   Documents are ``[bos] text [eos]``; in text files a blank line ends a document, in JSONL each
   line is one document (its ``text`` field).
3. ``TokenData`` memory-maps the file, holds out the tail as the validation split and serves
   fixed-length windows in a seeded order that is a pure function of the global sample index, so a
   resumed or multi-process run reads exactly the windows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import MMFError
from .outputs import atomic_directory
from .run_dir import RUN_CONFIG
from .tokenizer import HF_TOKENIZER_FILE, ByteTokenizer, load_tokenizer_file, train_bpe
from .tokenizer import load_saved_tokenizer  # noqa: F401 (mmf.evaluate imports it from here; its home is mmf.tokenizer)

CACHE_FORMAT = 1  # bump when the token file layout or document rules change
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
PIECE_CHARS = 1 << 20  # documents longer than this are tokenised in pieces of about this size
BATCH_CHARS = 4 << 20  # text handed to the tokenizer per batch
TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
BUILTIN_PREFIX = "builtin:"  # data path naming the embedded corpus, e.g. builtin:grammar


# ---------------------------------------------------------------------------------------------
# Inputs

def _in_mmf_run(f: Path, root: Path) -> bool:
    """Whether ``f`` lies in an `mmf train` run directory below ``root`` (one holding ``train_config.toml``): its
    metrics.jsonl is no corpus, so `--data .` in a directory where runs were started skips them."""
    d = f.parent
    while d != root and root in d.parents:
        if (d / RUN_CONFIG).is_file():
            return True
        d = d.parent
    return False


def resolve_files(paths: list[str], what: str = "training") -> list[Path]:
    """Files to read, in a fixed order; directories are searched recursively for text and JSONL (hidden files
    and mmf's own run directories skipped).

    ``what`` names the data in messages ("training", "evaluation")."""
    files: list[Path] = []
    for spec in paths:
        p = Path(spec).expanduser()
        if not p.exists():
            raise MMFError(f"{p}: no such file or directory; check the --data path")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts)
                           and not _in_mmf_run(f, p))
            if not found:
                raise MMFError(f"{p}: directory holds no {', '.join(TEXT_SUFFIXES)} files; point --data at text files")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise MMFError(f"no {what} data given; pass --data PATH (text, directory or .jsonl)")
    if all(f.stat().st_size == 0 for f in files):
        raise MMFError(f"the {what} data is empty ({', '.join(str(f) for f in files[:3])}); give files with text")
    return files


def iter_documents(path: Path, text_field: str = "text",
                   field_option: str = "data.text_field") -> Iterator[tuple[str, bool, bool]]:
    """Yield ``(text, starts_document, ends_document)`` pieces of one file, each at most ~1 MB.

    Text files: a blank line ends a document. JSONL: each line's ``text_field`` is a document;
    ``field_option`` is how the running command sets it (``mmf eval``: ``--text-field``), for messages.
    """
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise MMFError(f"{path}:{lineno}: not valid JSON ({e.__class__.__name__}); "
                                   "JSONL needs one JSON object per line") from None
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    fix = (f"give {field_option} FIELD, the field holding the text" if field_option.startswith("-")
                           else f"set {field_option} to the field holding the text")
                    raise MMFError(f"{path}:{lineno}: no string field {text_field!r}; {fix}")
                for i in range(0, max(len(text), 1), PIECE_CHARS):
                    yield text[i:i + PIECE_CHARS], i == 0, i + PIECE_CHARS >= len(text)
        return
    buf: list[str] = []
    size = 0
    start = True
    with open(path, "r", encoding="utf-8", newline="") as f:
        try:
            while True:
                line = f.readline(PIECE_CHARS)
                if not line:
                    break
                if not line.strip():  # a blank line ends the document
                    if buf:
                        yield "".join(buf), start, True
                        buf, size, start = [], 0, True
                    continue
                buf.append(line)
                size += len(line)
                if size >= PIECE_CHARS:
                    yield "".join(buf), start, False
                    buf, size, start = [], 0, False
        except UnicodeDecodeError as e:
            raise MMFError(f"{path}: not UTF-8 text ({e.reason} near byte {e.start} of a read); "
                           "convert it with iconv -t UTF-8 or remove it from --data") from None
    if buf or not start:
        yield "".join(buf), start, True


def iter_text(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """All document text, piece by piece (for training a tokenizer)."""
    for f in files:
        for text, _, _ in iter_documents(f, text_field):
            yield text


# ---------------------------------------------------------------------------------------------
# Token ids

def encode_pieces(tokenizer, pieces: list[tuple[str, bool, bool]]) -> np.ndarray:
    """Token ids of document pieces, with bos at each document start and eos at each end."""
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) + tokenizer.offset
                   for t, _, _ in pieces]
    else:
        encoded = [np.asarray(e.ids, dtype=np.int64)
                   for e in tokenizer.tok.encode_batch([t for t, _, _ in pieces], add_special_tokens=False)]
    out = []
    for ids, (_, start, end) in zip(encoded, pieces):
        if start and tokenizer.bos_id is not None:
            out.append(np.array([tokenizer.bos_id], dtype=np.int64))
        out.append(ids)
        if end and tokenizer.eos_id is not None:
            out.append(np.array([tokenizer.eos_id], dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The token cache

def _file_fingerprint(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(files: list[Path], tok_cfg, text_field: str, source: Optional[dict] = None) -> str:
    """Hash of everything the token file depends on."""
    tok = {"type": tok_cfg.type}
    if tok_cfg.type == "bpe":
        tok.update(vocab_size=tok_cfg.vocab_size, min_frequency=tok_cfg.min_frequency)
    elif tok_cfg.type == "file":
        p = Path(tok_cfg.path)
        tok["file"] = _file_fingerprint(p / HF_TOKENIZER_FILE if p.is_dir() else p) if p.exists() else str(p)
    spec = {"format": CACHE_FORMAT, "tokenizer": tok, "text_field": text_field,
            "inputs": source if source is not None else [_file_fingerprint(f) for f in files]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def writable_cache_dir(cache_dir: Path) -> None:
    """Create the token cache's directory, or refuse in one line naming ``data.cache_dir``."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise MMFError(f"data.cache_dir {cache_dir}: cannot create or write there ({e.strerror or e}); set "
                       "data.cache_dir to a writable directory") from None


def builtin_corpus_file(cache_dir: Path, n_bytes: int, seed: int) -> tuple[Path, dict]:
    """Write (once) the embedded grammar corpus into the cache; returns its path and its identity."""
    from . import corpus

    source = {"builtin": corpus.CORPUS_NAME, "version": corpus.CORPUS_VERSION, "bytes": n_bytes, "seed": seed}
    path = cache_dir / f"corpus-{corpus.CORPUS_NAME}-v{corpus.CORPUS_VERSION}-seed{seed}-{n_bytes}.txt"
    if not path.exists():
        writable_cache_dir(cache_dir)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            corpus.write_corpus(tmp, n_bytes, seed)
            os.replace(tmp, path)
        except BaseException:  # Ctrl-C or a full disk: no partial corpus left behind
            tmp.unlink(missing_ok=True)
            raise
    return path, source


def prepare_tokens(files: list[Path], tok_cfg, cache_dir: Path, text_field: str = "text",
                   source: Optional[dict] = None, log=None) -> Path:
    """Tokenise ``files`` into ``cache_dir/tokens-<hash>/`` unless that directory already exists."""
    cache_dir = Path(cache_dir)
    out = cache_dir / f"tokens-{cache_key(files, tok_cfg, text_field, source)}"
    if (out / META_FILE).exists():
        if log:
            log(f"reusing token cache {out}")
        return out
    if log:
        log(f"tokenising {len(files)} file(s) into {out}")
    writable_cache_dir(cache_dir)
    # an incomplete folder of this name (no meta.json) is this cache's own: replace it
    with atomic_directory(out, overwrite=True, is_ours=lambda p: True) as tmp:
        if tok_cfg.type == "byte":
            tokenizer = ByteTokenizer()
        elif tok_cfg.type == "file":
            tokenizer = load_tokenizer_file(Path(tok_cfg.path))
        else:
            tokenizer = train_bpe(iter_text(files, text_field), tok_cfg.vocab_size, tok_cfg.min_frequency)
        tokenizer.save(tmp)
        vocab = tokenizer.vocab_size
        dtype = np.uint16 if vocab <= 65536 else np.uint32
        counts = np.zeros(vocab, dtype=np.int64)
        n = 0
        with open(tmp / TOKENS_FILE, "wb") as fout:
            batch: list = []
            size = 0

            def flush():
                nonlocal n, batch, size
                ids = encode_pieces(tokenizer, batch)
                if ids.size and ids.max() >= vocab:
                    raise MMFError(f"the tokenizer produced id {int(ids.max())} >= its vocabulary size {vocab}")
                ids.astype(dtype).tofile(fout)
                counts[:] += np.bincount(ids, minlength=vocab)[:vocab]
                n += ids.size
                batch, size = [], 0

            for f in files:
                for piece in iter_documents(f, text_field):
                    batch.append(piece)
                    size += len(piece[0])
                    if size >= BATCH_CHARS:
                        flush()
            flush()
        if n == 0:
            raise MMFError(f"the training data holds no text ({', '.join(str(f) for f in files[:3])}); "
                           "give non-empty files")
        p = counts[counts > 0] / n
        meta = {"format": CACHE_FORMAT, "n_tokens": int(n), "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                "tokenizer": tok_cfg.type, "unigram_entropy": float(-(p * np.log(p)).sum()),
                "files": [str(f) for f in files[:100]], "n_files": len(files), "source": source}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Windows

@dataclass
class TokenData:
    """A memory-mapped token file split into train and validation, served as fixed-length windows."""

    tokens: np.ndarray
    n_train: int  # tokens [0, n_train) train; [n_train, n) validation
    seq_len: int
    seed: int = 0
    unigram_entropy: float = float("nan")

    @classmethod
    def open(cls, directory: Path, seq_len: int, val_fraction: float, seed: int = 0) -> "TokenData":
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        n = meta["n_tokens"]
        tokens = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,))
        n_val = max(int(n * val_fraction), seq_len + 1)
        if n - n_val < seq_len + 1:
            raise MMFError(
                f"the corpus has {n:,} tokens, too few for train.seq_len = {seq_len} plus a validation split of "
                f"{n_val:,}; lower train.seq_len (--set train.seq_len=N) or give more data")
        return cls(tokens, n - n_val, seq_len, seed, meta.get("unigram_entropy", float("nan")))

    @property
    def n_windows(self) -> int:
        return (self.n_train - 1) // self.seq_len

    def _order(self, epoch: int) -> np.ndarray:
        """The window order of one epoch (the last one computed is kept: a large corpus has millions)."""
        cached = self.__dict__.get("_order_cache")
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
            self.__dict__["_order_cache"] = cached
        return cached[1]

    def windows(self, indices) -> np.ndarray:
        """Global sample indices -> (len(indices), seq_len + 1) int64 windows (epochs reshuffled)."""
        nw, L = self.n_windows, self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, g in enumerate(indices):
            epoch, pos = divmod(int(g), nw)
            start = int(self._order(epoch)[pos]) * L
            out[row] = self.tokens[start:start + L + 1]
        return out

    def val_windows(self, max_tokens: int) -> np.ndarray:
        """Non-overlapping validation windows covering at most ``max_tokens`` targets."""
        L = self.seq_len
        n_val = self.tokens.shape[0] - self.n_train
        count = max(1, min((n_val - 1) // L, math.ceil(max_tokens / L)))
        starts = self.n_train + np.arange(count) * L
        return np.stack([np.asarray(self.tokens[s:s + L + 1], dtype=np.int64) for s in starts])


def batch_indices(step: int, batch_size: int, micro: int, grad_accum: int, rank: int, world: int) -> list[int]:
    """Global sample indices of one rank's micro-batch ``micro`` at optimiser step ``step``.

    The global batch of step s is samples [s * batch_size, (s + 1) * batch_size), however it is split
    over ranks and micro-steps, so every split sees the same data.
    """
    per = batch_size // (world * grad_accum)
    first = step * batch_size + (micro * world + rank) * per
    return list(range(first, first + per))
