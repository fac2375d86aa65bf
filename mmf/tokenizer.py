"""Tokenizers: the built-in byte-level one, and any Hugging Face ``tokenizer.json``.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos_id``,
``eos_id``, ``save(dir)`` and an incremental ``stream_decoder()`` for printing while generating.

Loading: ``load_tokenizer`` reads a model checkpoint's tokenizer with the bos/eos ids its config
gives; ``load_saved_tokenizer`` (a token cache or training checkpoint) and ``load_tokenizer_file``
(``tokenizer.path``) find bos/eos among common special tokens. ``train_bpe`` trains a byte-level BPE.
"""

from __future__ import annotations

import codecs
import json
import sys
import threading
from pathlib import Path
from typing import Iterable

from .errors import CheckpointError, MMFError

BYTE_TOKENIZER_FILE = "mmf_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: id 0 = pad, 1 = bos, 2 = eos, 3 + b = byte b (vocab 259)."""

    kind = "byte"
    offset = 3
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_bytes(self, data: bytes) -> list[int]:
        return [b + self.offset for b in data]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def stream_decoder(self):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token_id: int) -> str:
            if token_id < self.offset:
                return ""
            return dec.decode(bytes([token_id - self.offset]))

        return feed

    def save(self, directory: Path) -> None:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(
            json.dumps({"type": "byte", "offset": self.offset, "vocab_size": self.vocab_size,
                        "pad_id": 0, "bos_id": 1, "eos_id": 2}, indent=2) + "\n")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json`` (no network)."""

    kind = "hf"

    def __init__(self, tok, bos_id=None, eos_id=None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: Path, bos_id=None, eos_id=None) -> "HFTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        return cls(tok, bos_id, eos_id)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: one more than its largest id, added tokens included."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1 if vocab else 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self):
        ids: list[int] = []
        printed = [0]

        def feed(token_id: int) -> str:
            ids.append(token_id)
            text = self.decode(ids)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                return ""
            new = text[printed[0]:]
            printed[0] = len(text)
            return new

        return feed

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / HF_TOKENIZER_FILE))


def has_tokenizer(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / HF_TOKENIZER_FILE).is_file() or (directory / BYTE_TOKENIZER_FILE).is_file()


def missing_tokenizer_error(directory: Path) -> CheckpointError:
    return CheckpointError(
        f"{directory}: no tokenizer found (expected {HF_TOKENIZER_FILE} or {BYTE_TOKENIZER_FILE}); "
        "copy the model's tokenizer.json into the directory"
    )


def load_tokenizer(directory: Path, bos_id=None, eos_id=None):
    """The tokenizer saved in a checkpoint directory: ``tokenizer.json``, else ``mmf_tokenizer.json``
    (the byte tokenizer). A directory with neither is refused: guessing would give garbage text."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_FILE).exists():
        return HFTokenizer.from_file(directory / HF_TOKENIZER_FILE, bos_id, eos_id)
    if (directory / BYTE_TOKENIZER_FILE).exists():
        return ByteTokenizer()
    raise missing_tokenizer_error(directory)


def load_tokenizer_file(path: Path) -> HFTokenizer:
    """A ``tokenizer.json`` (or a directory holding one); bos/eos found among common special tokens."""
    path = Path(path)
    if path.is_dir():
        path = path / HF_TOKENIZER_FILE
    if not path.exists():
        raise MMFError(f"{path}: no such tokenizer file; set tokenizer.path to a tokenizer.json")
    tok = HFTokenizer.from_file(path)
    find = tok.tok.token_to_id
    tok.bos_id = next((i for t in ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]") if (i := find(t)) is not None), None)
    tok.eos_id = next((i for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
                       if (i := find(t)) is not None), None)
    return tok


def load_saved_tokenizer(directory: Path, fix: str = "give a checkpoint saved with its tokenizer"):
    """The tokenizer stored in a token cache or checkpoint directory, with its bos/eos ids.

    ``fix`` ends the message when there is none (a token cache: delete it to rebuild it)."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_FILE).exists():
        return load_tokenizer_file(directory / HF_TOKENIZER_FILE)
    if (directory / BYTE_TOKENIZER_FILE).exists():
        return ByteTokenizer()
    raise MMFError(f"{directory}: no tokenizer saved (neither {HF_TOKENIZER_FILE} nor {BYTE_TOKENIZER_FILE}); {fix}")


def check_tokenizer_fits(tokenizer, model_vocab_size, where=None) -> None:
    """Refuse a tokenizer that can produce ids outside the model's embedding table (garbage otherwise)."""
    n = tokenizer.vocab_size
    if model_vocab_size is not None and n > model_vocab_size:
        raise CheckpointError(
            f"{f'{where}: ' if where else ''}tokenizer vocab {n} > model vocab_size {model_vocab_size}: the "
            "tokenizer was not made for this model; put the model's own tokenizer.json beside its weights"
        )


def warn_if_no_tokenizer(source: Path, out: Path) -> None:
    """One line on stderr when ``out`` is written from ``source`` without a tokenizer (`mmf pack`, `mmf
    export-onnx`): `mmf generate` and `mmf eval` need one beside the weights."""
    if not has_tokenizer(source):
        sys.stderr.write(
            f"mmf: warning: {source} has no tokenizer ({HF_TOKENIZER_FILE} or {BYTE_TOKENIZER_FILE}), so {out} has "
            f"none either; `mmf generate` and `mmf eval` need one: copy the model's {HF_TOKENIZER_FILE} into {out}\n"
        )


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the presets' pad, bos and eos


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``texts`` with ``tokenizers``
    (``mmf.data.iter_text`` gives the text of training files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # tokenizers trains in Rust with the GIL released, where a Ctrl-C would wait for the training to end
    # (minutes on a large corpus): train in a daemon thread and keep the main thread free to take the signal
    # (Rust cannot be stopped: an interrupted training runs on in its thread until the process exits)
    failed = []

    def train():
        try:
            tok.train_from_iterator(texts, trainer)
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=train, name="mmf-bpe-train", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failed:
        raise failed[0]
    return HFTokenizer(tok, bos_id=1, eos_id=2)
