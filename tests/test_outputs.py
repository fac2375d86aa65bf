"""mmf.outputs: output directories follow the umask, --force replaces only what mmf wrote, a full disk is one line."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import mmf
from conftest import small_model
from mmf import outputs
from mmf.errors import MMFError
from mmf.outputs import atomic_directory, written_by_mmf


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def modes(path):
    """{relative path: permission bits} of a directory and everything in it."""
    out = {".": stat.S_IMODE(os.stat(path).st_mode)}
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def assert_modes(path, mask):
    for rel, mode in modes(path).items():
        want = (0o777 if os.path.isdir(os.path.join(path, rel)) else 0o666) & ~mask
        assert mode == want, (rel, oct(mode), oct(want))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_save_checkpoint_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "ck"
    mmf.save_checkpoint(small_model("mmf"), out, tokenizer=mmf.ByteTokenizer())
    assert_modes(out, mask)  # safetensors writes 0600 and mkdtemp 0700 on their own


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert outputs.current_umask() == 0o027
    assert outputs._umask_by_setting.__wrapped__() == 0o027  # the fallback restores what it read
    assert outputs.current_umask() == 0o027


def test_force_replaces_only_what_mmf_wrote(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    with pytest.raises(MMFError, match="is a file, not a directory that mmf wrote"):
        mmf.save_checkpoint(small_model("mmf"), notes, overwrite=True)
    assert notes.read_text() == "x\n"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("y")
    with pytest.raises(MMFError, match="mmf did not write"):
        mmf.save_checkpoint(small_model("mmf"), mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "y"
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(MMFError, match="symbolic link"):
        mmf.save_checkpoint(small_model("mmf"), link, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    mmf.save_checkpoint(small_model("mmf"), empty, overwrite=True)  # an empty directory loses nothing
    assert written_by_mmf(empty)
    mmf.save_checkpoint(small_model("mmf", seed=1), empty, overwrite=True)  # and now it is ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "mine", "notes.txt"]  # no temp left


def test_is_ours_can_be_given_by_the_caller(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    (d / "partial").write_text("z")
    with atomic_directory(d, overwrite=True, is_ours=lambda p: True) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in d.iterdir()) == ["meta.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, code):
    out = tmp_path / "out"
    with pytest.raises(MMFError) as e:
        with atomic_directory(out, need_bytes=10**6) as tmp:
            (tmp / "a").write_text("partial")
            raise OSError(code, os.strerror(code))
    msg = str(e.value)
    assert "no space left on device writing" in msg and "choose another --out" in msg and "\n" not in msg
    assert isinstance(e.value, OSError)  # callers that handle write failures (training) still see one
    assert list(tmp_path.iterdir()) == []


def test_full_disk_reported_by_a_library_as_text(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(MMFError, match="no space left on device"):
        with atomic_directory(tmp_path / "out"):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 3 * 10**6, 3 * 10**6))
    with pytest.raises(MMFError, match=r"needs about 1 GB but only 3 MB is free; free 997 MB"):
        with atomic_directory(tmp_path / "out", need_bytes=10**9):
            raise AssertionError("not reached")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    mmf.save_checkpoint(small_model("mmf"), out)
    before = (out / "model.safetensors").read_bytes()
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new output into place
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(outputs.os, "replace", flaky)
    with pytest.raises(OSError, match="I/O error"):
        mmf.save_checkpoint(small_model("mmf", seed=5), out, overwrite=True)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("command", ["pack", "unpack", "export-onnx", "fpga-image"])
def test_force_never_replaces_a_training_checkpoint_or_run(tiny_mmf_ckpt, tmp_path, monkeypatch, capsys, command):
    """`mmf pack RUN/step-0000300 --out RUN/step-0000200 --force` replaced a training checkpoint (optimiser and RNG
    state) with a packed model: every command's --force refuses one, and a whole run, in one line, touching nothing."""
    import shutil

    from conftest import main_in_process

    source = tiny_mmf_ckpt
    if command == "unpack":
        source = tmp_path / "packed"
        assert main_in_process(capsys, "pack", tiny_mmf_ckpt, "--out", source)[0] == 0
    run = tmp_path / "run"
    ckpt = run / "step-0000200"
    shutil.copytree(tiny_mmf_ckpt, ckpt)
    for name in outputs.TRAINING_STATE_FILES:
        (ckpt / name).write_bytes(b"state")
    (run / "train_config.toml").write_text("[train]\nsteps = 300\n")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for target in (ckpt, run):
        code, out, err = main_in_process(capsys, command, source, "--out", target, "--force")
        assert (code, out) == (2, ""), err
        assert err == (f"mmf: error: --out {target} holds a training checkpoint or run (optimiser and trainer state "
                       "that --resume needs); --force does not replace one, so delete it yourself or choose another "
                       "--out (nothing was changed)\n")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == ["step-0000200", "train_config.toml"]  # no temporary left
    assert written_by_mmf(ckpt)  # mmf wrote it: the refusal is the training state's, not the generic one


def test_a_training_checkpoint_may_still_be_rewritten_by_training(tmp_path):
    """The trainer writes its checkpoint with ``is_ours`` (a checkpoint rewritten at its own step); only the
    commands' --force (no ``is_ours``) refuses training state."""
    out = tmp_path / "step-0000004"
    out.mkdir()
    (out / "config.json").write_text('{"mmf_version": "0"}')
    (out / "trainer_state.json").write_text("{}")
    with pytest.raises(MMFError, match="holds a training checkpoint or run"):
        outputs.check_output(out, overwrite=True)
    with atomic_directory(out, overwrite=True, is_ours=written_by_mmf) as tmp:
        (tmp / "trainer_state.json").write_text('{"step": 4}')
    assert (out / "trainer_state.json").read_text() == '{"step": 4}' and not (out / "config.json").exists()
