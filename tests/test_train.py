"""`mmf train` end to end on CPU with a very small model: loss falls, resume is bit-exact, DDP on two
processes matches one process, Ctrl-C and NaN keep the last checkpoint, bad input is one clear line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mmf
from mmf.errors import MMFError
from mmf.train import list_checkpoints, schedule, train
from mmf.train_config import load_train_config


def small(tmp_path, *extra):
    """A model of ~30k parameters on 20 kB of the embedded corpus, byte tokenizer: a step takes milliseconds."""
    return ["tokenizer.type=byte", "model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
            "train.seq_len=32", "train.batch_size=4", "train.steps=8", "schedule.warmup_steps=2",
            "optim.lr=3e-3", "logging.every=1", "logging.eval_every=4", "logging.eval_tokens=256",
            "checkpoint.every=4", "logging.progress=false", "logging.plot=false", "data.builtin_bytes=20000",
            f"data.cache_dir={tmp_path / 'cache'}", *extra]


def cli_main(monkeypatch, capsys, *args):
    """Run mmf.cli.main.main() in-process: (exit code, stdout, stderr)."""
    from mmf.cli.main import main

    monkeypatch.setattr(sys, "argv", ["mmf", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_short_run_learns_and_writes_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli_main(monkeypatch, capsys, "train", "--out", out,
                                 *[a for s in small(tmp_path, "train.steps=40", "logging.plot=true") for a in ("--set", s)])
    assert code == 0, err
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert [r["step"] for r in records if "val_loss" in r][-1] == 40
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert "mmf generate" in stdout and "unigram entropy" in stdout
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step-0000036", "step-0000040"]  # the last K = 2 (tiny preset) kept
    model = mmf.load_model(ckpts[-1])
    assert model.config.vocab_size == 259 and model.config.hidden_size == 32
    from mmf.generate import generate_text

    assert isinstance(generate_text(ckpts[-1], "Once upon", 10, seed=0), str)
    code, stdout, err = cli_main(monkeypatch, capsys, "eval", ckpts[-1], "--data",
                                 tmp_path / "cache" / "corpus-grammar-v1-seed0-20000.txt", "--seq-len", 64, "--json")
    r = json.loads(stdout)
    assert code == 0 and r["tokens"] > 19000 and math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)


def test_resume_is_bit_exact(tmp_path):
    full = train(load_train_config("tiny", small(tmp_path, "train.grad_accum=2")), tmp_path / "a")
    first = train(load_train_config("tiny", small(tmp_path, "train.grad_accum=2")), tmp_path / "b", stop_after=3)
    assert first.interrupted and [c.name for c in list_checkpoints(tmp_path / "b")] == ["step-0000003"]
    from mmf.train import resume_config

    rest = train(resume_config(tmp_path / "b"), tmp_path / "b", resume=True)
    assert first.losses + rest.losses == full.losses  # bit-identical
    a = dict(mmf.checkpoint.iter_tensors(full.checkpoint))
    b = dict(mmf.checkpoint.iter_tensors(rest.checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((rest.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["samples_seen"] == 32 and state["optimizer"]["param_groups"]


def test_schedules():
    cfg = load_train_config("tiny", ["train.steps=100", "schedule.warmup_steps=10", "optim.lr=1.0",
                                     "schedule.min_lr_ratio=0.1", "optim.weight_decay=0.1"])
    assert schedule(cfg, 0)[0] == pytest.approx(0.1) and schedule(cfg, 9)[0] == pytest.approx(1.0)
    assert schedule(cfg, 99)[0] == pytest.approx(0.1) and schedule(cfg, 60)[1] == 0.1
    cfg.schedule.type = "two_stage"
    (lr49, wd49), (lr50, wd50) = schedule(cfg, 49), schedule(cfg, 50)
    assert wd49 == 0.1 and wd50 == 0.0 and lr50 < 0.55 * lr49
    cfg.schedule.type = "constant"
    assert schedule(cfg, 99)[0] == 1.0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import mmf.train as T

    real, calls = T.loss_of, [0]

    def poisoned(model, x, autocast):
        calls[0] += 1
        loss = real(model, x, autocast)
        return loss * float("nan") if calls[0] > 6 else loss  # calls 5-6 are the step-4 validation

    monkeypatch.setattr(T, "loss_of", poisoned)
    with pytest.raises(MMFError, match=r"loss became nan at step 5; the last good checkpoint is .*step-0000004"):
        train(load_train_config("tiny", small(tmp_path)), tmp_path / "run")
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-0000004"]
    mmf.load_model(tmp_path / "run" / "step-0000004")


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [a for s in small(tmp_path, "train.steps=100000", "checkpoint.every=100000") for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "mmf.cli.main", "train", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "Traceback" not in stderr and "--resume" in stdout
    (ckpt,) = list_checkpoints(out)
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert step >= 1
    mmf.load_model(ckpt)
    code, stdout, err = cli_main(monkeypatch, capsys, "train", "--resume", "--out", out, "--set", f"train.steps={step + 2}")
    assert code == 0 and f"resuming {out} from {ckpt.name}" in err, err
    assert list_checkpoints(out)[-1].name == f"step-{step + 2:07d}"


def test_ddp_and_fsdp_two_processes_match_one(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    """torchrun --nproc_per_node=2 (gloo) gives the loss trajectory of one process with the same global batch,
    with DDP and with FSDP; rank 0 alone writes; an FSDP checkpoint is an ordinary model checkpoint."""
    args = [a for s in small(tmp_path, "train.steps=6", "checkpoint.every=3", "model.num_hidden_layers=2")
            for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mmf.cli.main", "train", "--out", str(tmp_path / "one"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mmf.cli.main", "train", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if "loss" in json.loads(l)]
    a, b = loss(tmp_path / "one"), loss(tmp_path / "two")
    assert len(a) == len(b) == 6
    # Step 1 agrees to float rounding (same weights, same data). Later steps differ only through the order
    # of floating-point sums (the gradient all-reduce), which ternary rounding of weights and activations
    # can amplify into a discrete jump: measured 5e-4 relative at step 6, against ~1e-2 change per step.
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert all(x == pytest.approx(y, rel=2e-3) for x, y in zip(a, b))
    assert two.stdout.count("mmf train") == 1  # rank 0 alone reports
    assert [c.name for c in list_checkpoints(tmp_path / "two")] == ["step-0000003", "step-0000006"]
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mmf.cli.main", "train", "--out", str(tmp_path / "fsdp"), *args,
                           "--set", "distributed.strategy=fsdp"], capture_output=True, text=True, env=env, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    c = loss(tmp_path / "fsdp")
    assert c[0] == pytest.approx(a[0], rel=1e-6) and all(x == pytest.approx(y, rel=2e-3) for x, y in zip(a, c))
    one_w = dict(mmf.checkpoint.iter_tensors(tmp_path / "one" / "step-0000006"))
    fsdp_w = dict(mmf.checkpoint.iter_tensors(tmp_path / "fsdp" / "step-0000006"))
    assert one_w.keys() == fsdp_w.keys() and all(torch.allclose(one_w[k], fsdp_w[k], atol=1e-2) for k in one_w)


@pytest.mark.parametrize("case", ["empty", "missing", "unknown_key", "seq_len", "bad_out", "not_empty_out"])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("A short corpus.\n" * 20)
    (tmp_path / "file").write_text("x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    base = [a for s in small(tmp_path) for a in ("--set", s)]
    args, expect = {
        "empty": (["--data", empty], "empty"),
        "missing": (["--data", tmp_path / "nope.txt"], "nope.txt: no such file or directory"),
        "unknown_key": (["--set", "optim.learning_rate=1"], "unknown key 'learning_rate'; valid keys:"),
        "seq_len": (["--data", short, "--set", "train.seq_len=4096"], "too few for train.seq_len = 4096"),
        "bad_out": (["--out", tmp_path / "file" / "run"], "cannot write to output directory"),
        "not_empty_out": (["--out", tmp_path / "used"], "already exists and is not empty"),
    }[case]
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "run"]
    code, _, err = cli_main(monkeypatch, capsys, "train", *base, *args)
    assert code == 2
    lines = err.strip().splitlines()  # progress lines may come first (on stderr); then exactly one error line
    assert lines[-1].startswith("mmf: error: ") and sum("error" in l for l in lines) == 1, err
    assert "Traceback" not in err and expect in lines[-1], err


def test_print_config_and_eval_errors(tmp_path, monkeypatch, capsys):
    code, out, err = cli_main(monkeypatch, capsys, "train", "--config", "transformer++-tiny", "--print-config",
                              "--set", "train.steps=5", "--data", "a.txt")
    assert code == 0 and "steps = 5" in out and 'preset = "transformer++-tiny"' in out and 'paths = ["a.txt"]' in out
    p = tmp_path / "c.toml"
    p.write_text(out)
    assert load_train_config(str(p)).train.steps == 5
    code, _, err = cli_main(monkeypatch, capsys, "eval", tmp_path / "nope", "--data", p)
    assert code == 2 and err.startswith("mmf: error: ") and "no such checkpoint" in err and len(err.splitlines()) == 1


def test_transformer_with_a_tokenizer_file_on_jsonl(tmp_path):
    """The other architecture, a tokenizer.json and JSONL data, through the same config system."""
    from mmf.data import train_bpe

    docs = tmp_path / "docs.jsonl"
    from mmf.corpus import iter_stories

    stories = iter_stories(5)
    docs.write_text("".join(json.dumps({"text": next(stories), "id": i}) + "\n" for i in range(150)))
    train_bpe([docs], vocab_size=400).save(tmp_path)
    cfg = load_train_config("transformer++-tiny", small(tmp_path, "model.num_attention_heads=4",
                                                         "model.num_key_value_heads=2", "tokenizer.type=file",
                                                         f"tokenizer.path={tmp_path / 'tokenizer.json'}"),
                            data=[str(docs)])
    r = train(cfg, tmp_path / "run")
    model = mmf.load_model(r.checkpoint)
    assert model.config.arch == "transformer++" and model.config.vocab_size <= 400
    assert model.config.bos_token_id == 1 and (r.checkpoint / "tokenizer.json").exists()
    assert r.losses[-1] < r.losses[0]
    from mmf.generate import generate_text

    assert isinstance(generate_text(r.checkpoint, "Once", 5, seed=0), str)


def test_too_little_disk_is_reported_before_training(tmp_path, monkeypatch):
    from collections import namedtuple

    import mmf.train as T

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MMFError, match="GiB free but 3 checkpoints need about"):
        train(load_train_config("tiny", small(tmp_path)), tmp_path / "run")
    assert not list_checkpoints(tmp_path / "run") and not (tmp_path / "cache").exists()  # failed before any work


def test_ddp_matches_one_process_tightly_without_ternary_rounding(tmp_path):
    """Transformer++ (no quantisation to amplify summation-order differences): DDP on two processes follows
    one process to float rounding at every step."""
    args = [a for s in small(tmp_path, "train.steps=5", "checkpoint.every=100", "model.preset=transformer++-tiny",
                             "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                             "model.num_key_value_heads=2", "model.intermediate_size=64", "logging.eval_every=100")
            for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "mmf.cli.main"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "mmf.cli.main"])):
        res = subprocess.run([*launcher, "train", "--out", str(tmp_path / name), *args],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(l)]
    assert len(runs["one"]) == 5
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in zip(runs["one"], runs["two"])), runs
