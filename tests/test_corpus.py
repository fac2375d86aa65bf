"""The embedded grammar corpus: deterministic, English-like, the size asked for."""

from mmf.corpus import iter_stories, write_corpus


def test_corpus_is_deterministic_and_sized(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    na = write_corpus(a, 50_000, seed=3)
    write_corpus(b, 50_000, seed=3)
    write_corpus(c, 50_000, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert na == len(a.read_bytes()) and 50_000 <= na < 52_000


def test_stories_are_sentences_separated_by_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    write_corpus(p, 20_000, seed=0)
    docs = p.read_text().split("\n\n")
    assert docs[-1] == ""
    docs = docs[:-1]
    assert len(docs) > 20 and all("\n" not in d for d in docs)
    text = " ".join(docs)
    assert all(d[0].isupper() and d.rstrip()[-1] in '."' for d in docs)
    assert '"' in text and "," in text and "?" in text  # dialogue and punctuation
    words = set(text.replace(".", " ").replace(",", " ").split())
    assert len(words) > 150  # a varied vocabulary


def test_iter_stories_matches_file(tmp_path):
    p = tmp_path / "c.txt"
    write_corpus(p, 5_000, seed=7)
    gen = iter_stories(7)
    first = p.read_text().split("\n\n")[0]
    assert first == next(gen)


def test_the_default_bpe_on_the_embedded_corpus_has_936_entries_as_the_readme_says(tmp_path):
    """The README said "a 1024-entry byte-level BPE" while a default run printed vocab 936: BPE stops once every
    distinct pre-token of the corpus is one token (it never merges across them), short of 1024 here."""
    from pathlib import Path

    from tokenizers import pre_tokenizers

    from mmf.data import iter_text
    from mmf.tokenizer import train_bpe
    from mmf.train_config import load_train_config

    cfg = load_train_config("tiny")
    path = tmp_path / "corpus.txt"
    write_corpus(path, cfg.data.builtin_bytes, seed=cfg.data.builtin_seed)
    tok = train_bpe(iter_text([path], "text"), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    assert cfg.tokenizer.vocab_size == 1024 and tok.vocab_size == 936
    words = {w for d in iter_text([path], "text") for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False)
             .pre_tokenize_str(d)}
    assert len(words) == 330 and all(len(tok.tok.model.tokenize(w)) == 1 for w in words)
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert "up to `tokenizer.vocab_size` = 1024 entries on it: 936 on this corpus" in readme
    assert "1024-entry" not in readme
