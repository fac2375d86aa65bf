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
from pathlib import Path

import pytest
import torch

import mmf
from mmf.errors import MMFError
from mmf.run_dir import list_checkpoints
from mmf.train import schedule, train
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
    from mmf.run_dir import resume_config

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
    # ... which mmf.load_model reads on one device, giving the logits of the one-process run's weights
    m_fsdp, m_one = mmf.load_model(tmp_path / "fsdp" / "step-0000006"), mmf.load_model(tmp_path / "one" / "step-0000006")
    x = torch.randint(0, m_one.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lf, lo = m_fsdp(x).logits, m_one(x).logits
    assert torch.isfinite(lf).all() and ((lf - lo).norm() / lo.norm()) < 0.1
    # --resume under FSDP (two processes) from step 3 continues the run: steps 4-6 are the uninterrupted run's
    import shutil

    shutil.copytree(tmp_path / "fsdp", tmp_path / "fsdp_resumed")
    shutil.rmtree(tmp_path / "fsdp_resumed" / "step-0000006")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mmf.cli.main", "train", "--resume", "--out", str(tmp_path / "fsdp_resumed")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "from step-0000003 (step 3)" in res.stderr + res.stdout, res.stderr[-3000:]
    d = loss(tmp_path / "fsdp_resumed")
    assert len(d) == 6 and d == c  # bit-identical (measured; the same ranks, data order and reductions)


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
    from mmf.data import iter_text
    from mmf.tokenizer import train_bpe

    docs = tmp_path / "docs.jsonl"
    from mmf.corpus import iter_stories

    stories = iter_stories(5)
    docs.write_text("".join(json.dumps({"text": next(stories), "id": i}) + "\n" for i in range(150)))
    train_bpe(iter_text([docs]), vocab_size=400).save(tmp_path)
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

    import mmf.run_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mmf.run_dir.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MMFError, match=r"only 1 kB free but 3 checkpoints need about [\d.]+ MB"):  # not "0.00 GiB"
        train(load_train_config("tiny", small(tmp_path)), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # failed before any work


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


# ---------------------------------------------------------------------------------------------
# Issue 16: run directories, memory, messages, figures

def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """Item 5: two runs in one second shared runs/<name>-<time>/; the directory is now made exclusively."""
    from mmf.run_dir import make_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = load_train_config("tiny")
    frozen = lambda: 1_700_000_000.0  # noqa: E731
    a, b, c = make_run_dir(cfg, frozen), make_run_dir(cfg, frozen), make_run_dir(cfg, frozen)
    assert a.is_dir() and b == Path(f"{a}-2") and c == Path(f"{a}-3") and b.is_dir() and c.is_dir()
    # two processes racing for the same names: every directory goes to exactly one of them
    code = ("import os, sys, time; from mmf.run_dir import make_run_dir; from mmf.train_config import load_train_config; "
            "cfg = load_train_config('tiny'); open(sys.argv[1], 'w').close(); "
            "[time.sleep(0.005) for _ in iter(lambda: os.path.exists('go'), True)]; "
            "print(' '.join(str(make_run_dir(cfg, lambda: 1_600_000_000.0)) for _ in range(20)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"ready{i}"], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path) for i in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()):
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start making directories at once
    made = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(made[0]) == len(made[1]) == 20
    assert len(set(made[0]) | set(made[1])) == 40  # no directory handed to both


def test_out_naming_a_file_is_one_line_and_a_failed_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """Items 7 and 13: `train --out FILE` was an internal error; a run that fails before its first
    checkpoint leaves no run folder (with --out or under runs/)."""
    (tmp_path / "notes.txt").write_text("x\n")
    base = [a for s in small(tmp_path) for a in ("--set", s)]
    code, _, err = cli_main(monkeypatch, capsys, "train", *base, "--out", tmp_path / "notes.txt")
    assert code == 2 and err.startswith("mmf: error: ") and len(err.splitlines()) == 1, err
    assert "is a file, not a directory" in err and (tmp_path / "notes.txt").read_text() == "x\n"
    (tmp_path / "empty.txt").write_text("")
    code, _, err = cli_main(monkeypatch, capsys, "train", *base, "--data", tmp_path / "empty.txt", "--out", tmp_path / "r")
    assert code == 2 and "the training data is empty" in err and not (tmp_path / "r").exists()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(monkeypatch, capsys, "train", *base, "--data", tmp_path / "empty.txt")
    assert code == 2 and (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())


def _fake_memory(monkeypatch, available: float):
    import mmf.memory

    monkeypatch.setattr(mmf.memory, "available_bytes", lambda device: int(available))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--seq-len", "-1"], "--seq-len must be positive, got -1"),
    (["--print-config", "--batch-size", "-2"], "--batch-size must be positive, got -2"),
    (["--batch-size", "6", "--set", "train.grad_accum=4"],
     "preset tiny (with --set and --batch-size) [train]: batch_size 6 must be a multiple of grad_accum 4"),
    (["--set", "train.batch_size=0"], "preset tiny (with --set) [train]: batch_size must be positive, got 0"),
])
def test_train_option_errors_name_the_option_the_user_gave(tmp_path, monkeypatch, capsys, args, message):
    """`mmf train --batch-size 0` said "preset tiny (with --set) [train]: batch_size must be positive", blaming a
    --set that was not given: the message names --batch-size / --seq-len, and "with --set" only for a --set."""
    code, out, err = cli_main(monkeypatch, capsys, "train", "--out", tmp_path / "run", *args)
    assert (code, out, err) == (2, "", f"mmf: error: {message}\n")
    assert not (tmp_path / "run").exists()


def test_a_run_that_cannot_fit_is_refused_before_any_work_with_the_fix(tmp_path, monkeypatch, capsys):
    """Item 4: the 370m preset was OOM-killed after 71 s on a 24 GiB CPU. Memory is checked first; the
    refusal names what is needed and available and a setting that fits, which then passes the check."""
    from mmf.distributed import World
    from mmf.memory import check_training_memory, planned_model, training_memory

    cfg = load_train_config("tiny", small(tmp_path, "train.batch_size=8", "train.seq_len=64"))
    mcfg, n = planned_model(cfg)
    assert n == sum(p.numel() for p in mmf.models.build_model(mcfg).parameters()) and mcfg.vocab_size == 259
    need = lambda micro, seq=64: training_memory(mcfg, n, micro, seq).total  # noqa: E731
    _fake_memory(monkeypatch, (need(2) + need(4)) / 2)  # 8 sequences per micro-step do not fit, 2 do
    code, _, err = cli_main(monkeypatch, capsys, "train", *[a for s in small(tmp_path) for a in ("--set", s)],
                            "--batch-size", 8, "--seq-len", 64, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "training needs about" in err and "of memory" in err and "is available on this CPU" in err
    assert "--set train.grad_accum=4 (2 sequences each, same train.batch_size 8)" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # refused before any work
    check_training_memory(World(), load_train_config("tiny", small(tmp_path, "train.batch_size=8", "train.seq_len=64",
                                                                   "train.grad_accum=4")))
    _fake_memory(monkeypatch, (need(1, 32) + need(1, 64)) / 2)  # not even one 64-token sequence: shorter ones
    with pytest.raises(MMFError, match=r"--set train.grad_accum=8 --set train.seq_len=32; or train a smaller model"):
        check_training_memory(World(), cfg)


def test_gpu_sized_preset_on_the_cpu_warns_with_the_time_and_is_refused_on_24_gib(monkeypatch):
    """Item 4 as reported: `mmf train --config 370m` on a 24 GiB CPU."""
    from mmf.distributed import World
    from mmf.memory import check_training_memory

    lines = []
    _fake_memory(monkeypatch, 24 * 2**30)
    with pytest.raises(MMFError) as e:
        check_training_memory(World(), load_train_config("370m"), lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: 374M parameters is a GPU-sized model; on this CPU ")
    assert "20,000 steps x 524,288 tokens would take about " in lines[0] and "estimate" in lines[0]
    msg = str(e.value)
    assert "but 25.8 GB is available on this CPU" in msg and "--config tiny" in msg and "\n" not in msg
    assert "--set train.grad_accum=256 --set train.seq_len=" in msg  # one sequence per micro-step, shorter ones
    lines.clear()
    _fake_memory(monkeypatch, 2**50)
    check_training_memory(World(), load_train_config("370m"), lines.append)  # fits: the warning alone
    assert len(lines) == 1 and "GPU-sized" in lines[0]
    check_training_memory(World(), load_train_config("tiny"), lines.append)
    assert len(lines) == 1  # no warning for a CPU-sized model


def test_memory_estimate_matches_a_measured_training_step():
    """The estimate's calibration (mmf/memory.py) still holds: the peak RSS of two real AdamW steps of a
    one-layer model (d 512, vocabulary 8192, 1024 tokens) in a fresh process."""
    code = """
import json, torch
from contextlib import nullcontext
from mmf.config import MMFConfig
from mmf.models import build_model
from mmf.train import build_optimizer, loss_of
from mmf.train_config import load_train_config
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
rss = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))
open('/proc/self/clear_refs', 'w').write('5')
model = build_model(MMFConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=1)).init_weights()
opt = build_optimizer(model, load_train_config('tiny'), torch.device('cpu'))
x = torch.randint(0, 8192, (2, 513))
for _ in range(2):
    loss_of(model, x, nullcontext).backward(); opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({'peak': hwm() - rss, 'params': sum(p.numel() for p in model.parameters())}))
"""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak RSS")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    from mmf.config import MMFConfig
    from mmf.memory import training_memory

    est = training_memory(MMFConfig(vocab_size=8192, hidden_size=512, num_hidden_layers=1), r["params"], 2, 512)
    assert 0.85 < est.total / r["peak"] < 1.2, (est.total, r["peak"])


def test_interrupted_run_reports_validation_as_not_measured(tmp_path, monkeypatch, capsys):
    """Item 13: a run stopped before its first validation showed `nan`; --json prints the summary."""
    import functools

    import mmf.train as T

    monkeypatch.setattr(T, "train", functools.partial(T.train, stop_after=2))
    args = [a for s in small(tmp_path) for a in ("--set", s)]
    code, out, err = cli_main(monkeypatch, capsys, "train", *args, "--out", tmp_path / "a")
    assert code == 130 and "not measured (interrupted before the first validation)" in out and "nan" not in out
    code, out, err = cli_main(monkeypatch, capsys, "train", *args, "--out", tmp_path / "b", "--json")
    s = json.loads(out)
    assert code == 130 and s["interrupted"] and s["steps"] == 2 and s["val_loss"] is None and s["tokens"] == 2 * 4 * 32
    state = json.loads((tmp_path / "b" / "step-0000002" / "trainer_state.json").read_text())
    assert state["val_loss"] is None


def test_console_and_metrics_show_the_same_figures(tmp_path):
    """Item 15: the progress line showed the last step's loss and the whole run's tok/s while metrics.jsonl
    held means over the logging interval under the same names; now both are those means, labelled."""
    lines = []
    r = train(load_train_config("tiny", small(tmp_path, "logging.every=3", "logging.progress=true")),
              tmp_path / "run", log=lines.append)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if "loss" in x]
    assert [x["step"] for x in steps] == [3, 6, 8] and [x["steps_averaged"] for x in steps] == [3, 3, 2]
    assert steps[0]["loss"] == pytest.approx(sum(r.losses[:3]) / 3) and steps[2]["loss"] == pytest.approx(sum(r.losses[6:]) / 2)
    shown = [l for l in lines if l.startswith("step ") and "/8" in l]
    assert len(shown) == 3
    for line, x in zip(shown, steps):
        assert line.startswith(f"step {x['step']}/8  loss {x['loss']:.4f}  {x['tokens_per_s']:,.0f} tok/s "
                               f"(means over {x['steps_averaged']} steps)  lr {x['lr']:.2e}"), line


def test_a_one_step_run_says_1_step(tmp_path):
    """The start line and the progress line said "1 steps"."""
    lines = []
    train(load_train_config("tiny", small(tmp_path, "train.steps=1", "logging.progress=true")), tmp_path / "run",
          log=lines.append)
    assert any("; 1 step x 4 x 32 tokens on " in line for line in lines), lines
    assert any(line.startswith("step 1/1 ") and "(means over 1 step)  lr" in line for line in lines), lines
    assert not any("1 steps" in line for line in lines), lines


def test_ctrl_c_while_the_corpus_is_written_cleans_up_and_says_so(tmp_path):
    """Item 13: Ctrl-C while the embedded corpus was written left a .tmp file and printed nothing."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "mmf.cli.main", "train", "--out", str(tmp_path / "run"),
                             "--set", "data.builtin_bytes=500000000", "--set", f"data.cache_dir={cache}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120

    def writing():  # the corpus's temporary file exists and holds text
        return cache.is_dir() and any(p.name.startswith(".corpus") and p.stat().st_size for p in cache.iterdir())

    while time.time() < deadline and not writing():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "interrupted before the first checkpoint; nothing was saved" in stderr
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists()
