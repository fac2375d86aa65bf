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
