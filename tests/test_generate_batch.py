"""`mmf generate` with several prompts (issue 19): one batch, each prompt prefilled alone at its own length and
the recurrent states stacked; the same tokens as each prompt generated alone; output, JSON, bad input and the
memory check before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import main_in_process, small_model

import mmf.generate as gen
from mmf.generate import generate_batch_ids, generate_ids

HERE = Path(__file__).parent


def _prompts(seed, lengths=(1, 7, 3, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def frozen_mmf():
    return small_model("mmf", seed=1).freeze()


def test_batch_equals_each_prompt_alone_unequal_lengths(frozen_mmf):
    """Greedy: each row's tokens are that prompt's own; sampled with a seed: row i is prompt i alone with
    seed + i (the CPU's batched native step gives each row the single row's logits)."""
    prompts = _prompts(0)
    assert generate_batch_ids(frozen_mmf, prompts, 10) == [generate_ids(frozen_mmf, p, 10) for p in prompts]
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    got = generate_batch_ids(frozen_mmf, prompts, 10, seed=5, **kw)
    assert got == [generate_ids(frozen_mmf, p, 10, seed=5 + i, **kw) for i, p in enumerate(prompts)]
    assert generate_batch_ids(frozen_mmf, prompts, 0) == [[]] * 4


def test_rows_stop_at_their_end_token(frozen_mmf):
    """A row that samples the end token stops there (it is kept); the others go on to max_new_tokens."""
    prompts = _prompts(1)
    alone = [generate_ids(frozen_mmf, p, 8) for p in prompts]
    eos = alone[1][2]  # row 1's third token becomes the end token
    got = generate_batch_ids(frozen_mmf, prompts, 8, eos_id=eos)
    assert got == [generate_ids(frozen_mmf, p, 8, eos_id=eos) for p in prompts]
    assert got[1] == alone[1][:3] and len(max(got, key=len)) == 8


def test_transformer_takes_the_prompts_one_after_another():
    model = small_model("transformer++")
    prompts = _prompts(2, (2, 9, 4))
    assert generate_batch_ids(model, prompts, 5) == [generate_ids(model, p, 5) for p in prompts]


class _EagerDecoder:
    """GraphDecoder's interface (``batch``, ``state`` (L, batch, d), ``step``) over the eager model."""

    built: list = []

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        cfg = model.config
        self.state = torch.zeros(cfg.num_hidden_layers, batch, cfg.hidden_size)
        _EagerDecoder.built.append(batch)

    def step(self, ids):
        from mmf.models.hgrn_bit import RecurrentCache

        assert ids.shape == (self.batch,)
        out = self.model(ids[:, None], RecurrentCache(list(self.state.unbind(0)), 0))
        self.state.copy_(torch.stack(out.cache.states))
        return out.logits[:, -1]


def test_graph_path_chunks_and_pads_to_the_decoder_limit(frozen_mmf, monkeypatch):
    """With --graph, one decoder of the limit's rows serves every chunk: 5 prompts at a limit of 2 run as
    2 + 2 + 1 (padded) rows, each row its own prompt's tokens, row i sampling with seed + i."""
    import mmf.decode_graph

    monkeypatch.setattr(gen, "graph_batch_limit", lambda: 2)
    monkeypatch.setattr(mmf.decode_graph, "GraphDecoder", _EagerDecoder)
    _EagerDecoder.built = []
    prompts = _prompts(3, (4, 1, 6, 2, 5))
    kw = dict(temperature=0.8, seed=11)
    got = generate_batch_ids(frozen_mmf, prompts, 6, graph=True, **kw)
    assert got == [generate_ids(frozen_mmf, p, 6, temperature=0.8, seed=11 + i) for i, p in enumerate(prompts)]
    assert _EagerDecoder.built == [2]


def test_graph_decoder_batch_under_interpreter():
    """The same through the real GraphDecoder's Triton kernels (TRITON_INTERPRET=1, in a subprocess)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MMF_FORCE_REFERENCE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(HERE / "generate_batch_interp_cases.py")],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_several_prompts_text_and_json(tiny_mmf_ckpt, tmp_path, capsys):
    """Repeated --prompt and --prompts-file (one per line, blank lines skipped) make one batch; the text form
    puts each prompt under its own line, --json gives the same texts; one --prompt streams as before."""
    f = tmp_path / "p.txt"
    f.write_text("Once upon\n\nThe cat\r\n")
    code, out, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "Hello", "--prompts-file", f, "-n", "6",
                                     "-t", "0")
    assert code == 0, err
    blocks = out.split("=== prompt ")
    assert blocks[0] == "" and [b.split(" ===\n")[0] for b in blocks[1:]] == ["1 of 3", "2 of 3", "3 of 3"]
    texts = [b.split(" ===\n", 1)[1] for b in blocks[1:]]
    assert [t.startswith(p) for t, p in zip(texts, ["Hello", "Once upon", "The cat"])] == [True] * 3
    code, js, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "Hello", "--prompts-file", f, "-n", "6",
                                    "-t", "0", "--json")
    assert code == 0, err
    doc = json.loads(js)
    assert doc["prompts"] == doc["batch"] == 3 and doc["decode"] == "one batch, eager"
    assert [r["prompt"] for r in doc["results"]] == ["Hello", "Once upon", "The cat"]
    assert all(r["new_tokens"] <= 6 for r in doc["results"])
    assert "\n".join(f"=== prompt {i} of 3 ===\n{r['prompt']}{r['text']}" for i, r in enumerate(doc["results"], 1)) \
        + "\n" == out
    code, one, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "Hello", "-n", "6", "-t", "0")
    assert code == 0 and one == "Hello" + doc["results"][0]["text"] + "\n"


def _one_line(code, out, err, *fragments):
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("mmf: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def test_cli_bad_prompt_sources_are_one_line(tiny_mmf_ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    _one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompt-file", f, "--prompts-file", f),
              "--prompt-file reads its whole file as one prompt")
    _one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompts-file", blank), "no prompt in it")
    _one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompts-file", tmp_path / "nope"),
              "no such prompts file")
    _one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "a", "-p", ""), "the prompt is empty")


def test_prompts_beyond_memory_are_refused_before_prefill(tiny_mmf_ckpt, monkeypatch, capsys):
    """Prompts whose batch would not fit are refused in one line with the memory needed and available,
    before any prompt is prefilled (and nothing is written); MMF_MEMORY_CHECK=0 skips the check."""
    import mmf.memory
    from mmf.units import human_bytes

    cfg = gen.load_for_generate(tiny_mmf_ckpt)[0].config
    one = mmf.memory.generation_memory(cfg, 1, 4, 4, 4)  # the longest prompt: 4 tokens, fp32
    three = mmf.memory.generation_memory(cfg, 3, 4, 4, 4)
    avail = int(one.total + 1.5 * one.per_row)  # room for two rows, not three
    monkeypatch.setattr(mmf.memory, "available_bytes", lambda device: avail)

    def prefilled(*a, **k):
        raise AssertionError("prefilled before the memory check")

    monkeypatch.setattr(gen, "_prefill_rows", prefilled)
    _one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "abcd", "-p", "x", "-p", "yy", "-n", "4"),
              f"3 prompts need about {human_bytes(three.total)} of memory besides the loaded weights",
              f"{human_bytes(avail)} is available on this CPU", "give at most 2 prompts per call")
    monkeypatch.setenv("MMF_MEMORY_CHECK", "0")
    code, out, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "abcd", "-p", "x", "-p", "yy", "-n", "4")
    assert "prefilled before the memory check" in err


def test_every_end_token_of_a_list_stops_a_row(frozen_mmf):
    """config.json's eos_token_id may be a list (and generation_config.json add more, as Llama 3 Instruct's
    end-of-turn id): generation stops at any of them, as transformers' generate does."""
    prompts = _prompts(3)
    alone = [generate_ids(frozen_mmf, p, 8) for p in prompts]
    first, second = alone[0][1], alone[2][3]
    stops = (10**6, first, second)  # an id never sampled, then one that row 0 and one that row 2 samples
    assert generate_ids(frozen_mmf, prompts[0], 8, eos_id=stops) == alone[0][:alone[0].index(first) + 1]
    got = generate_batch_ids(frozen_mmf, prompts, 8, eos_id=stops)
    assert got == [generate_ids(frozen_mmf, p, 8, eos_id=stops) for p in prompts]
    assert got[2][-1] in stops and len(got[2]) <= 4


def test_end_tokens_join_config_and_generation_config(tmp_path, frozen_mmf, monkeypatch):
    monkeypatch.setattr(frozen_mmf.config, "eos_token_id", [2, 7])
    monkeypatch.setattr(frozen_mmf, "generation_eos", gen.generation_config_eos(tmp_path), raising=False)
    assert gen.end_tokens(frozen_mmf) == (2, 7)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "do_sample": True}))
    monkeypatch.setattr(frozen_mmf, "generation_eos", gen.generation_config_eos(tmp_path))
    assert gen.end_tokens(frozen_mmf) == (2, 7, 9)
    for bad in ("{not json", json.dumps({"eos_token_id": "x"}), json.dumps([1])):
        (tmp_path / "generation_config.json").write_text(bad)
        assert gen.generation_config_eos(tmp_path) is None  # transformers falls back to config.json then


def test_a_bos_outside_the_vocabulary_is_refused_before_any_output(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import mmf

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the cat sat on the mat. " * 20], trainers.BpeTrainer(
        vocab_size=200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = small_model("mmf", seed=4, vocab_size=tok.get_vocab_size(), bos_token_id=-1)
    mmf.save_checkpoint(model, tmp_path / "c")
    tok.save(str(tmp_path / "c" / "tokenizer.json"))
    code, out, err = main_in_process(capsys, "generate", tmp_path / "c", "-p", "the cat", "-n", "2")
    assert code == 2 and out == "" and "config.json's bos_token_id -1 is not a token id of this model" in err


@pytest.mark.parametrize("args, words", [
    (["-p", "a", "--seed", str(2**64)], "--seed 18446744073709551616: must be in 0..18446744073709551615"),
    (["-p", "a", "-p", "b", "--seed", str(2**64 - 1)], "must be in 0..18446744073709551614 (prompt i takes S + i - 1"),
    (["-p", "a", "--seed", "-1"], "--seed -1: must be in 0.."),
    (["--prompt-file", "."], ".: is a directory; --prompt-file takes a UTF-8 text file"),
    (["--prompts-file", "."], ".: is a directory; --prompts-file takes a UTF-8 text file"),
])
def test_seed_and_prompt_files_are_checked_before_any_output(tiny_mmf_ckpt, capsys, args, words):
    code, out, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-n", "2", *args)
    assert code == 2 and out == "" and words in err and len(err.strip().splitlines()) == 1, err


def test_a_kv_cache_beyond_memory_names_the_longest_generation_that_fits(monkeypatch):
    """Transformer++: the KV cache grows with --max-new-tokens, so that is the fix named, with a value that
    fits (and one more token that does not)."""
    from mmf import memory
    from mmf.errors import MMFError

    cfg = small_model("transformer++").config
    monkeypatch.setattr(memory, "available_bytes", lambda device: 50e6)
    with pytest.raises(MMFError, match=r"give --max-new-tokens at most (\d+) \(the KV cache") as e:
        memory.check_generation_memory(cfg, 1, 1, 7, 10**9, 4, "cpu", 10**6)
    n = int(e.value.args[0].split("at most ")[1].split(" ")[0])
    assert memory.check_generation_memory(cfg, 1, 1, 7, n, 4, "cpu", 10**6).total <= 50e6
    with pytest.raises(MMFError):
        memory.check_generation_memory(cfg, 1, 1, 7, n + 1, 4, "cpu", 10**6)
