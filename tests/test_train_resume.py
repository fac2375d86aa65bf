"""`mmf train --resume` and Ctrl-C: a refused resume changes nothing, a damaged checkpoint or metrics file is
one clear line (or is repaired), the run's tokenizer and optimiser settings are what runs, Ctrl-C in the final
validation keeps the final checkpoint, relative data paths resume from anywhere, the disk check counts the
checkpoints a run can write."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_train import cli_main, small

import mmf.train as T
from mmf.errors import MMFError
from mmf.run_dir import list_checkpoints, resume_config
from mmf.train import train
from mmf.train_config import load_train_config


def _corpus(path: Path, seed: int = 0, docs: int = 300) -> None:
    import random

    rng = random.Random(seed)
    w = "the cat sat on a mat and dog ran to big red house with tree under sky blue bird sang song".split()
    path.write_text("\n\n".join(" ".join(rng.choice(w) for _ in range(rng.randint(10, 40))) + "."
                                for _ in range(docs)) + "\n")


def _sets(*items) -> list:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 6-step run (checkpoints at steps 4 and 6) started with a RELATIVE --data path."""
    root = tmp_path_factory.mktemp("resume")
    _corpus(root / "data.txt")
    cfg = load_train_config("tiny", small(root, "model.num_hidden_layers=2", "train.steps=6", "checkpoint.every=2",
                                          "checkpoint.keep=2", "logging.eval_every=3"), data=["data.txt"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train(cfg, root / "run", log=lambda *a: None)
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.fixture
def run(base_run, tmp_path):
    """A fresh copy of ``base_run`` (in a directory that is not where it was started)."""
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def _resume(monkeypatch, capsys, run, *sets):
    return cli_main(monkeypatch, capsys, "train", "--resume", "--out", run, *_sets(*sets))


@pytest.mark.parametrize("bad, expect", [
    ("train.batch_size=8", "saved with train.batch_size 4, now 8; keep train.batch_size to resume"),
    ("train.seq_len=16", "saved with train.seq_len 32, now 16; keep train.seq_len to resume"),
    ("model.hidden_size=64", "step-0000006: saved with model.hidden_size 32, now 64; resume with the run's own model "
                             "settings (drop --set model.hidden_size)"),
    ('data.paths=["gone.txt"]', "gone.txt: no such file or directory"),
])
def test_a_refused_resume_leaves_the_run_as_it_was(run, monkeypatch, capsys, bad, expect):
    """Item 1: a refused --resume rewrote train_config.toml with the refused setting, so every later resume
    failed too. Item 5: a changed train.seq_len is refused like train.batch_size."""
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = _resume(monkeypatch, capsys, run, bad, "train.steps=8")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("mmf: error: ") and expect in lines[-1], err
    assert "Traceback" not in err and sum("error" in l for l in lines) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config and metrics untouched
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=8")  # a plain resume still works
    assert code == 0, err
    assert list_checkpoints(run)[-1].name == "step-0000008" and "steps = 8" in (run / "train_config.toml").read_text()


@pytest.mark.parametrize("sets, expect", [
    (["model.hidden_size=64", "model.num_hidden_layers=3"],
     "saved with model.hidden_size 32 and model.num_hidden_layers 2, now 64 and 3; resume with the run's own model "
     "settings (drop --set model.hidden_size and model.num_hidden_layers)"),
    (["model.intermediate_size=128"], "saved with model.intermediate_size 64, now 128"),
    (["model.preset=transformer++-tiny"], "saved with model.model_type hgrn_bit, now llama; resume with the run's own "
                                          "model settings (drop the --set that changes model.preset)"),
])
def test_a_resume_with_another_model_names_the_settings_before_any_work(run, monkeypatch, capsys, sets, expect):
    """`--resume --set model.hidden_size=128` was PyTorch's "size mismatch ... copying a param with shape" cut
    mid-word, after tokenising the data: now one line naming the settings, before anything else is printed."""
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = _resume(monkeypatch, capsys, run, *sets, "train.steps=8")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"mmf: error: {run / 'step-0000006'}: saved with model.") and expect in err, err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("resume, step", [(False, "step-0000006"), (True, "step-0000006"), (False, "step-0000009")])
def test_out_naming_a_checkpoint_says_to_pass_its_run(run, monkeypatch, capsys, resume, step):
    """`mmf train --out RUN/step-0000006` said "already exists and is not empty; pass --resume to continue it", but
    --resume on a checkpoint failed too ("no checkpoint to resume from"): both now name the run to pass. A new
    step-NNNNNNN inside a run is refused as well (the run would hold a folder that looks like its checkpoint)."""
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = cli_main(monkeypatch, capsys, "train", *(["--resume"] if resume else []), "--out", run / step,
                              *_sets("train.steps=8"))
    assert (code, out) == (2, "") and err == (f"mmf: error: --out {run / step} names a checkpoint of the run {run}, "
                                              f"not a run directory; to continue that run pass --resume --out {run}, "
                                              "or choose a new --out for a new run\n")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (run / "step-0000009").exists()


def test_the_run_config_is_written_atomically(run, monkeypatch, capsys):
    """Item 1: the run config goes to a temporary name, then one rename (no partial file on a failure)."""
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real(a, b))[1])
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=7")
    assert code == 0, err
    assert any(b == "train_config.toml" and a.startswith(".train_config.toml.tmp") for a, b in renamed), renamed


def test_ctrl_c_during_the_final_validation_saves_the_final_checkpoint(tmp_path, monkeypatch, capsys):
    """Item 2: Ctrl-C during the last validation deleted the whole run (no checkpoint yet); now the validation
    is skipped, the final checkpoint is written and the exit status is 130."""
    real = T.loss_of

    def interrupting(model, x, autocast):
        if not model.training:  # the final validation (eval_every is past the end): Ctrl-C during it
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, x, autocast)

    monkeypatch.setattr(T, "loss_of", interrupting)
    out = tmp_path / "run"
    code, stdout, err = cli_main(monkeypatch, capsys, "train", "--out", out,
                                 *_sets(*small(tmp_path, "train.steps=3", "checkpoint.every=1000",
                                               "logging.eval_every=1000", "logging.eval_tokens=1024")))
    assert code == 130 and "Traceback" not in err, err
    assert "interrupted during the final validation" in err
    (ckpt,) = list_checkpoints(out)
    assert ckpt.name == "step-0000003" and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and not any("val_loss" in r for r in records)
    assert "Continue with" not in stdout  # its last step is done: a resume would have nothing to do


def test_ctrl_c_writes_the_loss_record_of_the_steps_since_the_last_one(tmp_path):
    """Item 2: the losses since the last metrics line were lost on Ctrl-C; a partial record keeps them."""
    r = train(load_train_config("tiny", small(tmp_path, "logging.every=2")), tmp_path / "run", stop_after=3,
              log=lambda *a: None)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if "loss" in x]
    assert r.interrupted and [(x["step"], x["steps_averaged"]) for x in steps] == [(2, 2), (3, 1)]
    assert steps[1]["loss"] == pytest.approx(r.losses[2])


def test_a_partial_last_metrics_line_is_dropped_on_resume(run, monkeypatch, capsys):
    """Item 3a: a truncated last line (a crash, a full disk) made --resume an internal JSONDecodeError."""
    from mmf.train_report import plot_metrics

    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    plot_metrics(run / "metrics.jsonl", run / "curve.png", 3.0)  # reads past the partial line
    assert (run / "curve.png").stat().st_size > 1000
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=8")
    assert code == 0, err
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_full_disk_while_writing_metrics_is_one_line_and_leaves_no_partial_record(run, monkeypatch):
    """Item 3b: ENOSPC while appending to metrics.jsonl was an internal OSError and left half a line."""
    import mmf.train_report as R
    from mmf.distributed import World

    before = (run / "metrics.jsonl").read_bytes()
    reporter = R.Reporter(World(), run, 8, 6, False, lambda *a: None)
    real = os.write

    def half_then_full(fd, data):
        real(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(R.os, "write", half_then_full)
        with pytest.raises(MMFError) as e:
            reporter.write({"step": 7, "loss": 1.0})
    msg = str(e.value)
    assert "No space left on device" in msg and f"the last good checkpoint is {run / 'step-0000006'}" in msg
    assert "\n" not in msg and (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("damage, name", [("remove", "rng.safetensors"), ("remove", "optimizer.safetensors"),
                                          ("garble", "optimizer.safetensors"), ("garble", "trainer_state.json"),
                                          ("garble", "rng.safetensors")])
def test_a_damaged_newest_checkpoint_is_one_line_naming_the_file(run, monkeypatch, capsys, damage, name):
    """Item 3c: a missing or corrupt optimiser/RNG/state file was an internal error or blamed the settings."""
    f = run / "step-0000006" / name
    if damage == "remove":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[:40])
    config = (run / "train_config.toml").read_bytes()
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=8")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("mmf: error: ") and "Traceback" not in err, err
    assert str(f) in line and "the checkpoint is damaged" in line and f"remove {run / 'step-0000006'}" in line
    assert "from step-0000004, the previous complete checkpoint" in line
    assert (run / "train_config.toml").read_bytes() == config
    shutil.rmtree(run / "step-0000006")  # what the line says to do
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=8")
    assert code == 0 and "from step-0000004 (step 4)" in err, err


def test_resume_after_the_data_changed_keeps_the_bpe_tokenizer(tmp_path, monkeypatch, capsys):
    """Item 4: --resume retrained the BPE tokenizer on changed data: token ids changed meaning mid-run."""
    data = tmp_path / "d.txt"
    _corpus(data)
    out = tmp_path / "run"
    code, _, err = cli_main(monkeypatch, capsys, "train", "--out", out, "--data", data,
                            *_sets(*small(tmp_path, "tokenizer.type=bpe", "tokenizer.vocab_size=300", "train.steps=4")))
    assert code == 0, err
    with open(data, "a") as f:
        f.write("\n\n" + "zebra quokka xylophone jukebox fjord wizard " * 200)
    code, _, err = _resume(monkeypatch, capsys, out, "train.steps=6")
    assert code == 0 and "using the tokenizer of step-0000004" in err, err
    first = (out / "step-0000004" / "tokenizer.json").read_bytes()
    assert (out / "step-0000006" / "tokenizer.json").read_bytes() == first
    assert 'type = "bpe"' in (out / "train_config.toml").read_text()  # the run's config is unchanged
    state = json.loads((out / "step-0000006" / "trainer_state.json").read_text())
    assert (Path(state["tokens_dir"]) / "tokenizer.json").read_bytes() == first  # the tokens it trained on


def test_resume_applies_changed_betas_and_eps(run, tmp_path, monkeypatch, capsys):
    """Item 5: --set optim.betas/eps on --resume were recorded in the config but the restored optimiser
    state brought back the old ones; now the restored param groups take the config's values."""
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    code, _, err = _resume(monkeypatch, capsys, plain, "train.steps=8")
    assert code == 0, err
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=8", "optim.betas=[0.5,0.6]", "optim.eps=1e-3")
    assert code == 0, err
    groups = json.loads((run / "step-0000008" / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert all(g["betas"] == [0.5, 0.6] and g["eps"] == 1e-3 for g in groups)
    cfg = resume_config(run)
    assert list(cfg.optim.betas) == [0.5, 0.6] and cfg.optim.eps == 1e-3
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if "loss" in json.loads(l)]
    assert loss(run)[:6] == loss(plain)[:6] and loss(run)[6:] != loss(plain)[6:]  # they ran


def test_a_run_started_with_relative_data_paths_resumes_from_anywhere(base_run, run, monkeypatch, capsys, tmp_path):
    """Item 6: data paths were recorded as given, so --resume from another directory found no data."""
    paths = resume_config(run).data.paths
    assert paths == [str(base_run.parent / "data.txt")] and Path(paths[0]).is_absolute()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = _resume(monkeypatch, capsys, run, "train.steps=7")
    assert code == 0 and list_checkpoints(run)[-1].name == "step-0000007", err


def test_the_disk_check_counts_the_checkpoints_the_run_can_write(tmp_path, monkeypatch):
    """Item 7: checkpoint.keep=1000000 on a 6-step run asked for 1000001 checkpoints of disk."""
    from collections import namedtuple

    import mmf.run_dir
    from mmf.run_dir import preflight

    per = 10_000 * 12 + (1 << 20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mmf.run_dir.shutil, "disk_usage", lambda p: usage(10**12, 0, per * 4 + 100))
    preflight(tmp_path / "a", 10_000, 1_000_000, 6, 2)  # 3 written + 1 being written: fits
    with pytest.raises(MMFError, match=r"but 5 checkpoints need"):
        preflight(tmp_path / "b", 10_000, 1_000_000, 7, 2)  # steps 2, 4, 6, 7 + 1
    with pytest.raises(MMFError, match=r"but 3 checkpoints need"):
        preflight(tmp_path / "c", 10**9, 2, 100, 2)  # keep binds when smaller


def test_print_config_refuses_what_a_run_refuses(monkeypatch, capsys, tmp_path):
    """`--print-config` resolves the config as the run would (``resolve_config``): the same one-line refusals."""
    for args, words in ((["--resume"], "--resume needs --out RUN_DIR"),
                        (["--resume", "--out", str(tmp_path), "-c", "tiny"], "drop --config/--data")):
        code, out, err = cli_main(monkeypatch, capsys, "train", "--print-config", *args)
        assert code == 2 and out == "" and words in err, err
