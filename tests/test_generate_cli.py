"""`mmf generate` and `mmf info` as a user meets them, and the CLI conventions every command shares
(issue 16 items 7, 8, 12, 14, 15): options checked before anything is written, --device names, --debug
anywhere, -h, help without <bool>, pipeline order, a formatted info table."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import main_in_process

from mmf.errors import CheckpointError, MMFError




def _assert_one_line(code, out, err, *fragments):
    assert code == 2, (code, err)
    assert err.startswith("mmf: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    assert out == "", f"a failed call wrote to stdout: {out!r}"


def _bad_generate_options():
    cases = [
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--device", f"cuda:{torch.cuda.device_count()}"],
         "pick one of those" if torch.cuda.is_available() else "--device cpu"),
        (["--top-k", "-3"], "--top-k -3: must be >= 0"),
        (["-t", "-1"], "--temperature -1.0: must be a finite number >= 0"),
        (["-t", "nan"], "--temperature nan"),
        (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
        (["--top-p", "0"], "(1 = off"),
        (["-n", "-1"], "--max-new-tokens -1: must be >= 0"),
        (["--dtype", "fp8"], "use one of fp32, bf16, fp16"),
        (["--graph"], "--graph replays CUDA graphs"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "use --device cpu"))
    return cases


@pytest.mark.parametrize("extra,fragment", _bad_generate_options())
def test_generate_refuses_bad_options_before_writing(tiny_mmf_ckpt, monkeypatch, capsys, extra, fragment):
    """Each out-of-range option is one line with the fix and exit 2 (not "internal error"), and the prompt is not
    written: a failed call leaves redirected output empty."""
    _assert_one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "Hello", "-n", "3", *extra),
                     fragment)


def test_generate_checks_options_before_loading(tmp_path, monkeypatch, capsys):
    """Options are checked before the checkpoint is read, so the option's own message comes first."""
    _assert_one_line(*main_in_process(capsys, "generate", tmp_path / "missing", "-p", "x", "--top-k", "-1"),
                     "--top-k -1")


def test_generate_writes_nothing_when_loading_or_tokenising_fails(tiny_mmf_ckpt, tmp_path, monkeypatch, capsys):
    _assert_one_line(*main_in_process(capsys, "generate", tmp_path / "missing", "-p", "Hello"),
                     "no such checkpoint directory")
    _assert_one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", ""), "the prompt is empty")
    _assert_one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompt-file", tmp_path),
                     "is a directory; --prompt-file takes a UTF-8 text file")
    _assert_one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompt-file", tmp_path / "none.txt"),
                     "no such prompt file")
    for text, what in (("", "empty"), (" \n\n", "only whitespace")):  # generated from no prompt, exit 0
        (tmp_path / "blank.txt").write_text(text)
        _assert_one_line(*main_in_process(capsys, "generate", tiny_mmf_ckpt, "--prompt-file", tmp_path / "blank.txt"),
                         f"mmf: error: --prompt-file {tmp_path / 'blank.txt'}: no prompt in it (the file is {what}); "
                         "write the prompt into it or pass --prompt TEXT\n")
    code, out, err = main_in_process(capsys, "generate", tiny_mmf_ckpt, "-p", "Hello", "-n", "4", "-t", "0")
    assert code == 0 and out.startswith("Hello") and out.endswith("\n"), err


def test_generate_onnx_refuses_device_and_foreign_dtype(tiny_mmf_ckpt, tmp_path, monkeypatch, capsys):
    """--device was silently ignored with --onnx: the export runs on ONNX Runtime's CPU provider here."""
    from mmf.converters.onnx_export import export_onnx

    _assert_one_line(*main_in_process(capsys, "generate", "--onnx", tmp_path, "-p", "x", "--device", "cuda"),
                     "--device cuda does not apply to --onnx")
    _assert_one_line(*main_in_process(capsys, "generate", "--onnx", tmp_path, "-p", "x", "--top-p", "0"),
                     "--top-p 0.0")
    out = tmp_path / "onnx"
    export_onnx(tiny_mmf_ckpt, out, check=False)
    _assert_one_line(*main_in_process(capsys, "generate", "--onnx", out, "-p", "x", "--dtype", "fp16"),
                     "--dtype fp16", "exported in fp32", "mmf export-onnx --dtype fp16")
    code, text, err = main_in_process(capsys, "generate", "--onnx", out, "-p", "Hi", "-n", "3", "-t", "0",
                            "--dtype", "fp32", "--device", "auto")
    assert code == 0 and text.startswith("Hi"), err


def test_another_mmf_output_given_as_a_checkpoint_says_what_to_pass(tiny_mmf_ckpt, tmp_path, monkeypatch, capsys):
    """`mmf generate ONNX_DIR -p hi` said "config.json: no such file; a checkpoint directory needs config.json", and
    a training run the same: each now says what it is and what to pass (--onnx; one of the run's checkpoints).
    The checkpoint commands share the check (eval, info, pack), and --onnx given a checkpoint says so too."""
    import shutil

    from mmf.checkpoint_layout import FPGA_MANIFEST, ONNX_MANIFEST
    from mmf.converters.onnx_export import MANIFEST_FILE, export_onnx
    from mmf.fpga.manifest import FORMAT_NAME, MANIFEST

    assert ONNX_MANIFEST[0] == MANIFEST_FILE and FPGA_MANIFEST == (MANIFEST, FORMAT_NAME)
    onnx = tmp_path / "onnx"
    export_onnx(tiny_mmf_ckpt, onnx, check=False)
    _assert_one_line(*main_in_process(capsys, "generate", onnx, "-p", "hi"),
                     f"mmf: error: {onnx} is an ONNX export (mmf export-onnx), not a checkpoint; run it with --onnx: "
                     f"mmf generate --onnx {onnx} -p TEXT\n")
    _assert_one_line(*main_in_process(capsys, "generate", "--onnx", tiny_mmf_ckpt, "-p", "hi"),
                     f"mmf: error: {tiny_mmf_ckpt} is a checkpoint, not an ONNX export (no mmf_onnx.json); pass it as "
                     "CHECKPOINT without --onnx")
    run = tmp_path / "run"
    (run / "step-0000100").mkdir(parents=True)  # an incomplete checkpoint (no trainer_state.json): not offered
    (run / "train_config.toml").write_text("")
    msg = f"{run} is a training run with no complete checkpoint yet (no step-NNNNNNN/ in it); pass a checkpoint"
    _assert_one_line(*main_in_process(capsys, "generate", run, "-p", "hi"), msg)
    for step in ("step-0000200", "step-0000300"):
        shutil.copytree(tiny_mmf_ckpt, run / step)
        (run / step / "trainer_state.json").write_text("{}")
    msg = (f"mmf: error: {run} is a training run, not a checkpoint; pass one of its checkpoints, e.g. "
           f"{run / 'step-0000300'} (it holds step-0000200, step-0000300)\n")
    _assert_one_line(*main_in_process(capsys, "generate", run, "-p", "hi"), msg)
    _assert_one_line(*main_in_process(capsys, "info", run), msg)
    _assert_one_line(*main_in_process(capsys, "eval", run, "--data", tiny_mmf_ckpt / "config.json"), msg)
    _assert_one_line(*main_in_process(capsys, "pack", run, "--out", tmp_path / "packed"), msg)
    assert not (tmp_path / "packed").exists()


def test_resolve_device():
    from mmf.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:", "cuda:x", "gpu", ""):
        with pytest.raises(MMFError, match="cpu, cuda, cuda:N or auto"):
            resolve_device(bad)
    with pytest.raises(MMFError, match="use --device cpu|pick one of those"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(MMFError, match="use --bench-device cpu"):
            resolve_device("cuda", option="--bench-device")


def test_debug_flag_anywhere_and_the_hint(tmp_path, monkeypatch, capsys):
    """`mmf generate ... --debug` shows the traceback like `mmf --debug generate ...`; the internal-error hint
    names a form that works."""
    from mmf.cli.main import main, split_debug_flag

    assert split_debug_flag(["generate", "ck", "--debug", "-p", "x"]) == (["--debug", "generate", "ck", "-p", "x"],
                                                                        True)
    assert split_debug_flag(["generate", "ck", "--", "--debug"]) == (["generate", "ck", "--", "--debug"], False)
    for args in (["generate", tmp_path / "nope", "-p", "x", "--debug"], ["--debug", "generate", tmp_path / "nope", "-p", "x"]):
        with pytest.raises(CheckpointError):
            main([str(a) for a in args])
    capsys.readouterr()

    def broken(path):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr("mmf.info.checkpoint_info", broken)
    code, out, err = main_in_process(capsys, "info", tmp_path)
    assert code == 1 and "internal error: RuntimeError: something unexpected" in err and "add --debug" in err, err
    with pytest.raises(RuntimeError):
        main(["info", str(tmp_path), "--debug"])


def test_help_short_flag_no_bool_metavar_and_pipeline_order(monkeypatch, capsys):
    from mmf.cli.app import PIPELINE_ORDER

    code, top, _ = main_in_process(capsys, "-h")
    assert code == 0 and "Usage: mmf" in top
    listed = [name for name in re.findall(r"^│ ([a-z][a-z-]*)\s", top, flags=re.M)]
    assert listed == list(PIPELINE_ORDER), listed
    assert main_in_process(capsys, "--help")[1] == top
    for cmd in PIPELINE_ORDER:
        code, short, err = main_in_process(capsys, cmd, "-h")
        assert code == 0 and f"Usage: mmf {cmd}" in short, (cmd, err)
        assert short == main_in_process(capsys, cmd, "--help")[1]
        assert "<bool>" not in short, (cmd, short)
    assert "<bool>" not in top
    gen = " ".join(re.sub(r"[│╭╮╰╯─]", " ", main_in_process(capsys, "generate", "-h")[1]).split())
    assert "default: random" in gen and "default: fp32" in gen and "[default: 200]" in gen


def test_info_table_is_formatted(tiny_mmf_ckpt, monkeypatch, capsys):
    """Numbers get thousands separators, the ternary share a percentage, lists are joined; --json stays raw."""
    code, raw, err = main_in_process(capsys, "info", tiny_mmf_ckpt, "--json")
    assert code == 0, err
    data = json.loads(raw)
    assert isinstance(data["ternary_share"], float) and isinstance(data["files"], list)
    code, table, err = main_in_process(capsys, "info", tiny_mmf_ckpt)
    assert code == 0, err
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.splitlines()[3:] if line.strip())
    assert rows["parameters"].startswith(f"{data['parameters']:,} (") and data["parameters"] >= 1000
    assert rows["ternary_share"] == f"{100 * data['ternary_share']:.1f} %"
    assert rows["files"] == ", ".join(data["files"]) and "[" not in table.split("files", 1)[1]
    for dtype, n in data["bytes_by_dtype"].items():
        assert rows[f"bytes[{dtype}]"].startswith(f"{n:,} (") and "iB)" in rows[f"bytes[{dtype}]"]
    assert not re.search(r"\d\.\d{5,}", table), table  # no raw floats


@pytest.mark.parametrize("args", [["bench", "--model", "370m", "--json", "r.json"],
                                  ["fpga-image", "ck", "--out", "img", "--json", "report.json"]])
def test_old_json_file_spelling_names_json_out(monkeypatch, capsys, args):
    """`--json FILE` of bench and fpga-image became `--json-out FILE`: the old spelling says so (one line, exit 2)
    instead of Typer's "unexpected extra argument"; `--json` as the flag still parses."""
    code, out, err = main_in_process(capsys, *args)
    _assert_one_line(code, out, err, f"--json-out {args[-1]}")
    from mmf.cli.main import check_old_json_path

    check_old_json_path(["info", "--json", "ck"])  # a flag followed by the positional argument: not the old form
    check_old_json_path(["bench", "--json", "--model", "370m"])


def test_generate_never_samples_ids_past_the_tokenizer(tmp_path, capsys):
    """A model whose vocabulary is larger than its tokenizer's (a padded embedding table) used to sample ids the
    tokenizer could not decode (byte tokenizer: 'internal error: bytes must be in range(0, 256)'): sampling is
    limited to the tokenizer's ids, greedy and sampled alike."""
    import mmf
    from conftest import small_model
    from mmf.generate import generate_ids
    from mmf.models.common import ModelOutput

    class LoudTail:  # logits whose largest entries lie past id 258
        config = type("C", (), {"vocab_size": 300, "eos_token_id": None})()

        def __call__(self, ids, cache=None):
            logits = torch.zeros(ids.shape[0], ids.shape[1], 300)
            logits[..., 259:] = 50.0
            logits[..., 7] = 1.0
            return ModelOutput(logits, cache)

    assert generate_ids(LoudTail(), [1, 2], 3, vocab_limit=259) == [7, 7, 7]
    assert all(t < 259 for t in generate_ids(LoudTail(), [1, 2], 5, temperature=1.0, seed=0, vocab_limit=259))
    ck = tmp_path / "ck"
    mmf.save_checkpoint(small_model("mmf", vocab_size=300), ck, tokenizer=mmf.ByteTokenizer())
    code, out, err = main_in_process(capsys, "generate", ck, "-p", "Hi", "-n", "20", "-t", "1", "--seed", "0")
    assert code == 0 and out.startswith("Hi") and err == "", err


def test_info_counts_the_same_parameters_packed_and_float(tiny_mmf_ckpt, tmp_path):
    """A packed checkpoint's scale tensors are not parameters: `mmf info` gives the float checkpoint's count
    and the same ternary share."""
    from mmf.converters.packing import pack_checkpoint
    from mmf.info import checkpoint_info

    pack_checkpoint(tiny_mmf_ckpt, tmp_path / "packed")
    packed, src = checkpoint_info(tmp_path / "packed"), checkpoint_info(tiny_mmf_ckpt)
    assert packed["parameters"] == src["parameters"] and packed["ternary_share"] == src["ternary_share"]
