"""The data pipeline: inputs, documents, the cached token file, the split and the windows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmf.data import TokenData, batch_indices, iter_documents, iter_text, prepare_tokens, resolve_files
from mmf.errors import MMFError
from mmf.tokenizer import load_saved_tokenizer, train_bpe
from mmf.train_config import TokenizerConfig

BYTE = TokenizerConfig(type="byte")


def test_resolve_files_expands_directories_and_rejects_missing(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee\n")
    (d / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    (d / "image.png").write_bytes(b"\x89PNG")
    (d / ".hidden.txt").write_text("no")
    assert resolve_files([str(d)]) == [d / "b.txt", d / "sub" / "a.jsonl"]
    with pytest.raises(MMFError, match="no such file"):
        resolve_files([str(tmp_path / "nope.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MMFError, match="empty"):
        resolve_files([str(tmp_path / "empty.txt")])


def test_documents_split_at_blank_lines_and_jsonl_lines(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("one\ntwo\n\n\nthree\n")
    assert list(iter_documents(t)) == [("one\ntwo\n", True, True), ("three\n", True, True)]
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "x y"}\n\n{"body": "z", "text": "w"}\n')
    assert list(iter_documents(j)) == [("x y", True, True), ("w", True, True)]
    j.write_text('{"text": "x"}\n{"body": "z"}\n')
    with pytest.raises(MMFError, match=r"b.jsonl:2: no string field 'text'"):
        list(iter_documents(j))
    j.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(MMFError, match=r"b.jsonl:2: not valid JSON"):
        list(iter_documents(j))


def test_token_cache_is_built_once_and_rebuilt_when_data_changes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hi\n\nyo\n")
    logs = []
    d1 = prepare_tokens([f], BYTE, tmp_path / "cache", log=logs.append)
    meta = json.loads((d1 / "meta.json").read_text())
    tokens = np.fromfile(d1 / "tokens.bin", dtype=meta["dtype"])
    b = lambda s: [c + 3 for c in s.encode()]  # noqa: E731
    assert tokens.tolist() == [1, *b("hi\n"), 2, 1, *b("yo\n"), 2]
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == tokens.size
    stamp = (d1 / "tokens.bin").stat().st_mtime_ns
    d2 = prepare_tokens([f], BYTE, tmp_path / "cache", log=logs.append)
    assert d2 == d1 and (d2 / "tokens.bin").stat().st_mtime_ns == stamp and "reusing" in logs[-1]
    f.write_text("hi\n\nyo!\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    d3 = prepare_tokens([f], BYTE, tmp_path / "cache")
    assert d3 != d1
    assert isinstance(load_saved_tokenizer(d3).encode("a"), list)


def test_split_windows_and_sharding(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(65, 91)) * 40)  # 1040 bytes, one document
    d = prepare_tokens([f], BYTE, tmp_path / "cache")
    data = TokenData.open(d, seq_len=16, val_fraction=0.1, seed=1)
    n = data.tokens.shape[0]
    assert n == 1042 and data.n_train == n - 104
    assert data.n_windows == (data.n_train - 1) // 16
    epoch = data.windows(range(data.n_windows))
    assert epoch.shape == (data.n_windows, 17)
    starts = sorted(int(np.flatnonzero((data.tokens[:data.n_train] == w[0]))[0]) for w in epoch[:1])
    assert starts  # windows come from the train part
    # one epoch visits every window once; the next epoch reshuffles
    firsts = {tuple(w) for w in epoch}
    assert len(firsts) == len({tuple(data.tokens[i * 16:i * 16 + 17]) for i in range(data.n_windows)})
    assert not np.array_equal(data.windows(range(data.n_windows, 2 * data.n_windows)), epoch)
    assert np.array_equal(data.windows([3, 4]), epoch[3:5])
    val = data.val_windows(10_000)
    assert val.shape[1] == 17 and val[0, 0] == data.tokens[data.n_train]
    # the global batch is the same however ranks and micro-steps split it
    one = batch_indices(5, 8, 0, 1, 0, 1)
    split = [i for m in range(2) for r in range(2) for i in batch_indices(5, 8, m, 2, r, 2)]
    assert sorted(split) == one == list(range(40, 48))
    with pytest.raises(MMFError, match="too few for train.seq_len = 2000"):
        TokenData.open(d, seq_len=2000, val_fraction=0.1)


def test_bpe_tokenizer_trains_saves_and_round_trips(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("the cat sat on the mat. the dog sat on the log.\n\n" * 50)
    tok = train_bpe(iter_text([f]), vocab_size=300)
    assert tok.vocab_size <= 300 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.tok.id_to_token(0) == "<pad>"
    text = "the cat sat on the log."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())
    tok.save(tmp_path)
    again = load_saved_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.eos_id == 2


def test_messages_name_the_running_commands_data_and_option(tmp_path):
    """Issue 16 item 13: eval's messages speak of evaluation data and --text-field; a directory without a
    tokenizer is not told to delete itself unless it is a token cache."""
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MMFError, match="the evaluation data is empty"):
        resolve_files([str(tmp_path / "empty.txt")], "evaluation")
    with pytest.raises(MMFError, match="the training data is empty"):
        resolve_files([str(tmp_path / "empty.txt")])
    j = tmp_path / "b.jsonl"
    j.write_text('{"body": "z"}\n')
    with pytest.raises(MMFError, match=r"no string field 'text'; give --text-field FIELD, the field holding the text"):
        list(iter_documents(j, "text", "--text-field"))
    with pytest.raises(MMFError, match=r"no string field 'text'; set data.text_field to the field holding the text"):
        list(iter_documents(j))
    with pytest.raises(MMFError, match="no tokenizer saved") as e:
        load_saved_tokenizer(tmp_path)
    assert "delete" not in str(e.value)
    with pytest.raises(MMFError, match="; delete it to rebuild it$"):
        load_saved_tokenizer(tmp_path, fix="delete it to rebuild it")


def test_ctrl_c_during_bpe_training_stops_it_at_once(tmp_path):
    """tokenizers trains in Rust with the main thread blocked outside Python, where a Ctrl-C waited for the
    whole training (seconds to minutes): train_bpe keeps the main thread free, so it stops within a second."""
    script = f"""
import sys, time
from pathlib import Path
from mmf import corpus
from mmf.data import iter_text
from mmf.tokenizer import train_bpe
p = Path({str(tmp_path / 'c.txt')!r})
corpus.write_corpus(p, 40_000_000, 0)
print("ready", flush=True)
t0 = time.time()
try:
    train_bpe(iter_text([p]), vocab_size=4096)
    print("finished", time.time() - t0, flush=True)
except KeyboardInterrupt:
    print("interrupted", time.time() - t0, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    what, seconds = out.split()
    assert what == "interrupted" and float(seconds) < 1.5, (out, err)


def test_a_directory_scan_skips_mmf_run_directories(tmp_path):
    """`--data .` where runs were started: a run's metrics.jsonl is not a corpus."""
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat.\n")
    run = tmp_path / "runs" / "tiny-1"
    (run / "step-0000002").mkdir(parents=True)
    (run / "train_config.toml").write_text('base = "tiny"\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "more.md").write_text("a dog ran.\n")
    assert resolve_files([str(tmp_path)]) == [tmp_path / "corpus.txt", tmp_path / "notes" / "more.md"]
    assert resolve_files([str(run / "metrics.jsonl")]) == [run / "metrics.jsonl"]  # named explicitly: read


def test_an_unusable_cache_dir_is_one_line(tmp_path):
    (tmp_path / "d.txt").write_text("the cat sat on the mat.\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MMFError, match=r"data.cache_dir .*file/cache: cannot create or write there .*; set "
                                       r"data.cache_dir to a writable directory"):
        prepare_tokens([tmp_path / "d.txt"], TokenizerConfig(type="byte"), blocker / "cache")
