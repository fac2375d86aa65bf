"""The `mmf` command end to end: help, version, generate, info, and bad input as one clear line."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import main_in_process, run_cli


def assert_one_line_error(res, *fragments):
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
    for f in fragments:
        assert f in err, err


def test_help_lists_commands_and_version():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("generate", "info"):
        assert cmd in res.stdout
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("mmf ")


@pytest.mark.parametrize("fixture", ["tiny_mmf_ckpt", "tiny_llama_ckpt"])
def test_generate_streams_text(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    res = run_cli("generate", ckpt, "--prompt", "The cat", "--max-new-tokens", "12", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The cat") and len(res.stdout) > len("The cat\n")
    again = run_cli("generate", ckpt, "--prompt", "The cat", "--max-new-tokens", "12", "--temperature", "0")
    assert again.stdout == res.stdout  # greedy is deterministic
    sampled = [run_cli("generate", ckpt, "-p", "A", "-n", "20", "-t", "1.0", "--top-k", "50", "--top-p", "0.9",
                       "--seed", str(s)).stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_info_table_and_json(tiny_mmf_ckpt):
    res = run_cli("info", tiny_mmf_ckpt, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["architecture"] == "mmf" and 0.5 < data["ternary_share"] < 1
    assert data["parameters"] == sum(data["parameters_by_group"].values())
    table = run_cli("info", tiny_mmf_ckpt)
    assert "ternary_share" in table.stdout


def test_bad_input_gives_one_clear_line(tmp_path, tiny_mmf_ckpt):
    assert_one_line_error(run_cli("generate", tmp_path / "nope", "-p", "x"), "no such checkpoint directory")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_mmf_ckpt, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:100])
    assert_one_line_error(run_cli("generate", corrupt, "-p", "x"), "model.safetensors", "corrupt or truncated")

    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_mmf_ckpt, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["use_short_conv"] = True  # a setting mmf does not implement (unknown keys are accepted, as transformers does)
    (unknown / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("info", unknown), "use_short_conv = true is not supported", "mmf supports false")

    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_mmf_ckpt, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (mismatch / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", mismatch, "-p", "x"), "mlp.", "has shape", "config.json implies")

    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9 latin-1")
    assert_one_line_error(run_cli("generate", tiny_mmf_ckpt, "--prompt-file", prompt), "not UTF-8")

    assert_one_line_error(run_cli("generate", tiny_mmf_ckpt, "-p", "x", "--graph"),
                          "--graph replays CUDA graphs: it needs --device cuda")
    assert_one_line_error(run_cli("generate", "-p", "x", "--graph", "--onnx", tmp_path), "--graph and --onnx")

    # --debug shows the traceback instead
    res = run_cli("--debug", "generate", tmp_path / "nope", "-p", "x")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_generate_uses_checkpoint_tokenizer_json(tmp_path):
    """A checkpoint with a Hugging Face tokenizer.json decodes through the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    import mmf
    from conftest import small_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], trainer)
    model = small_model("mmf", seed=21, vocab_size=tok.get_vocab_size())
    mmf.save_checkpoint(model, tmp_path / "c")
    tok.save(str(tmp_path / "c" / "tokenizer.json"))
    loaded = mmf.load_tokenizer(tmp_path / "c")
    assert loaded.kind == "hf" and loaded.decode(loaded.encode("the cat")) == "the cat"
    res = run_cli("generate", tmp_path / "c", "-p", "the cat", "-n", "10", "-t", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("the cat") and len(res.stdout) > len("the cat\n")


def test_every_command_has_a_one_line_summary():
    """`mmf --help` shows each command's first docstring paragraph: it must be a single line."""
    from mmf.cli.main import app

    names = []
    for cmd in app.registered_commands:
        doc = (cmd.callback.__doc__ or "").strip()
        summary = doc.split("\n\n")[0]
        assert summary and "\n" not in summary, (cmd.name or cmd.callback.__name__, summary)
        names.append(cmd.name or cmd.callback.__name__.replace("_", "-"))
    for expected in ("train", "generate", "pack", "unpack", "inspect", "export-onnx", "fpga-image", "bench", "info",
                     "eval"):
        assert expected in names


def test_help_paragraphs_wrap_to_the_terminal():
    """Every paragraph of a command's help is one line for rich to wrap (Typer keeps a docstring's single
    line breaks, which showed ragged at 80 columns); a paragraph marked with \\b keeps its line breaks."""
    from typer.main import get_command

    from mmf.cli.app import one_line_per_paragraph
    from mmf.cli.main import app

    group = get_command(app)
    for name, cmd in group.commands.items():
        paragraphs = cmd.help.split("\n\n")
        assert all("\n" not in p for p in paragraphs), (name, cmd.help)
    assert len(group.commands["bench"].help.split("\n\n")) == 2  # the second paragraph is kept apart
    text = "First line.\n\n    Second\n    paragraph.\n\n    \b\n    kept\n    as is"
    assert one_line_per_paragraph(text) == "First line.\n\nSecond paragraph.\n\n\b\nkept\nas is"


@pytest.mark.parametrize("args, words", [
    (["pack", "CK"], ["Missing option '--out' / '-o'", "see `mmf pack -h`"]),
    (["generate", "CK", "--top-kk", "3"], ["No such option: --top-kk", "--top-k", "see `mmf generate -h`"]),
    (["generate", "CK", "-n", "many"], ["Invalid value for '--max-new-tokens'", "see `mmf generate -h`"]),
    (["genrate"], ["No such command 'genrate'", "see `mmf -h`"]),
])
def test_usage_errors_are_one_line(capsys, tmp_path, args, words):
    """Typer's usage errors (unknown, missing or bad options) are one line on stderr with where to look, exit 2,
    no box (Typer's own format is a box of six lines)."""
    code, out, err = main_in_process(capsys, *[str(tmp_path) if a == "CK" else a for a in args])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mmf: error: ") and "╭" not in err and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_bare_mmf_prints_the_help_once(capsys):
    code, out, err = main_in_process(capsys)
    assert code == 2 and err == "" and out.count("Usage: mmf") == 1 and "export-onnx" in out


def test_force_never_deletes_a_file_and_outputs_follow_the_umask(tiny_mmf_ckpt, tmp_path):
    """Issue 16 items 9 and 11, verbatim: `echo x > notes.txt; mmf pack CK --out notes.txt --force`."""
    import os
    import stat

    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    res = run_cli("pack", tiny_mmf_ckpt, "--out", notes, "--force")
    assert res.returncode == 2
    assert_one_line_error(res, "is a file, not a directory that mmf wrote", "choose another --out")
    assert notes.read_text() == "x\n"
    old = os.umask(0o022)  # inherited by the command
    try:
        res = run_cli("pack", tiny_mmf_ckpt, "--out", tmp_path / "packed")
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "packed"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "mmf_tokenizer.json": 0o644}


def test_eval_bad_options_and_data_are_one_line_naming_evals_own_options(tiny_mmf_ckpt, tmp_path):
    """Issue 16 items 7 and 13: `eval --max-tokens 0` / `-1` were an internal error; eval's messages name
    the evaluation data and its own --text-field option."""
    text = tmp_path / "a.txt"
    text.write_text("The cat sat on the mat.\n" * 20)
    for bad in ("0", "-1"):
        res = run_cli("eval", tiny_mmf_ckpt, "--data", text, "--max-tokens", bad)
        assert res.returncode == 2
        assert_one_line_error(res, f"--max-tokens {bad}: give a positive number", "leave it out")
    from mmf.errors import MMFError
    from mmf.evaluate import evaluate_checkpoint

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MMFError, match="the evaluation data is empty"):
        evaluate_checkpoint(tiny_mmf_ckpt, [str(tmp_path / "empty.txt")])
    (tmp_path / "d.jsonl").write_text('{"body": "The cat."}\n')
    with pytest.raises(MMFError, match="no string field 'text'; give --text-field FIELD"):
        evaluate_checkpoint(tiny_mmf_ckpt, [str(tmp_path / "d.jsonl")])
    assert evaluate_checkpoint(tiny_mmf_ckpt, [str(tmp_path / "d.jsonl")], text_field="body")["tokens"] > 0
    assert evaluate_checkpoint(tiny_mmf_ckpt, [str(text)], seq_len=16, max_tokens=1)["tokens"] == 1


def test_eval_max_tokens_reports_bits_per_byte_of_the_text_scored(tiny_mmf_ckpt, tmp_path, capsys):
    """`mmf eval --max-tokens N` dropped bits_per_byte from the table and the JSON: it is now over the bytes of the
    text that the first N + 1 tokens spell (all the data's when N covers it), and a cap reached in the first file
    stops reading the others."""
    import math

    from mmf.evaluate import evaluate_checkpoint

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("The cat sat on the mat.\n\nA dog ran.\n")
    second.write_text("Birds sing in the morning.\n")
    files = [str(first), str(second)]
    whole = evaluate_checkpoint(tiny_mmf_ckpt, files, seq_len=16)
    capped = evaluate_checkpoint(tiny_mmf_ckpt, files, seq_len=16, max_tokens=10**6)
    n_bytes = len("The cat sat on the mat.\nA dog ran.\nBirds sing in the morning.\n")  # each document's line
    assert math.isclose(whole["bits_per_byte"], whole["loss"] * whole["tokens"] / math.log(2) / n_bytes)
    assert {k: v for k, v in capped.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    # the byte tokenizer: bos, then one token per byte; 20 scored tokens are the first 20 bytes of "The cat ..."
    r = evaluate_checkpoint(tiny_mmf_ckpt, files, seq_len=16, max_tokens=20)
    assert r["tokens"] == 20 and math.isclose(r["bits_per_byte"], r["loss"] / math.log(2), rel_tol=1e-12)
    broken = tmp_path / "c.jsonl"
    broken.write_text("not JSON\n")  # read only if the first file falls short of the cap
    again = evaluate_checkpoint(tiny_mmf_ckpt, [str(first), str(broken)], seq_len=16, max_tokens=20)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in r.items() if k != "seconds"}
    code, out, err = main_in_process(capsys, "eval", tiny_mmf_ckpt, "--data", first, "--seq-len", "16",
                                     "--max-tokens", "20", "--json")
    assert code == 0 and math.isclose(json.loads(out)["bits_per_byte"], r["bits_per_byte"]), err
    code, out, err = main_in_process(capsys, "eval", tiny_mmf_ckpt, "--data", first, "--max-tokens", "20")
    assert code == 0 and "bits_per_byte" in out, err
