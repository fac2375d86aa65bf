"""Output directories: written atomically, with the user's umask, replacing only what mmf wrote.

Every command that writes a directory (``save_checkpoint`` and training checkpoints, ``pack``,
``unpack``, ``export-onnx``, ``fpga-image``, the token cache) goes through ``atomic_directory``:

* the output is built in a temporary directory beside ``out`` and moved into place in one rename,
  so an error leaves nothing half-written and the previous ``out`` (if any) intact;
* before the rename every directory and file in it gets the mode a plain ``mkdir``/``open`` gives
  (0777/0666 minus the umask): ``tempfile.mkdtemp`` makes 0700 and safetensors writes 0600, which
  would leave a checkpoint readable by its owner only while its ``config.json`` is 0644;
* ``--force`` (``overwrite``) replaces only a directory that mmf wrote (``written_by_mmf``): a plain
  file or someone else's directory named by ``--out`` by mistake is refused, never deleted; so is a
  training checkpoint or run (``holds_training_state``: the optimiser and trainer state ``--resume`` needs);
* a full disk (ENOSPC) or an exceeded quota (EDQUOT) is one ``MMFError`` line, the partial output removed.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from .errors import MMFError
from .run_dir import TRAINING_STATE_FILES, is_run_dir
from .units import human_bytes

# What marks a directory as written by mmf (a file in it and the JSON field that must hold).
# The writers: mmf.checkpoint.save_checkpoint, training checkpoints, pack and unpack write config.json
# with "mmf_version"; a packed checkpoint also has quantization_config.quant_method "mmf_ternary";
# export-onnx writes mmf_onnx.json {"format": "mmf-onnx"}; fpga-image writes manifest.json
# {"format": "mmf-fpga-image"}. tests/test_outputs.py checks that each writer's output is recognised.
ONNX_MANIFEST = ("mmf_onnx.json", "mmf-onnx")  # (file, its "format"), as mmf.onnx_runtime and fpga/manifest.py write
FPGA_MANIFEST = ("manifest.json", "mmf-fpga-image")
_MARKERS = (
    ("config.json", lambda d: "mmf_version" in d
     or (isinstance(d.get("quantization_config"), dict) and d["quantization_config"].get("quant_method") == "mmf_ternary")),
    (ONNX_MANIFEST[0], lambda d: d.get("format") == ONNX_MANIFEST[1]),
    (FPGA_MANIFEST[0], lambda d: d.get("format") == FPGA_MANIFEST[1]),
)
DISK_FULL_ERRNOS = tuple(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e is not None)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # as Rust and C libraries word them


class DiskFullError(MMFError, OSError):
    """A full disk or quota while writing an output: one line for the user (an ``MMFError``), and still an
    ``OSError`` (errno ENOSPC) for callers that handle write failures, such as training's checkpoint writer."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def current_umask() -> int:
    """The process umask. Read from /proc on Linux (no change to the process state); elsewhere set and
    restored once and cached (``os.umask`` can only be read by setting it, and a file created by another
    thread in between would get the temporary mask)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the modes a plain ``mkdir``/``open``
    would have given under the current umask: directories 0777 & ~umask, files 0666 & ~umask (0777 &
    ~umask where the file was executable). Symbolic links are left alone."""
    mask = current_umask()

    def fix_file(p: str) -> None:
        st = os.lstat(p)
        if not os.path.islink(p):
            os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)

    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        fix_file(str(path))
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            fix_file(os.path.join(root, name))


def written_by_mmf(path: Path) -> bool:
    """True for an empty directory or one an mmf command wrote (see ``_MARKERS``): what ``--force`` may replace."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    for fname, holds in _MARKERS:
        data = _json_object(path / fname)
        if data is not None and holds(data):
            return True
    return False


def _json_object(path: Path) -> Optional[dict]:
    """The JSON object in file ``path``, or None (no such file, unreadable, not JSON, not an object)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holds_manifest(directory: Path, manifest: tuple) -> bool:
    """Does ``directory`` hold ``manifest`` (``ONNX_MANIFEST``, ``FPGA_MANIFEST``): that file, with that format?"""
    data = _json_object(Path(directory) / manifest[0])
    return data is not None and data.get("format") == manifest[1]


def holds_training_state(path: Path) -> bool:
    """True for a training checkpoint (its optimiser, RNG or trainer state, what ``--resume`` needs) or a training
    run directory (its ``train_config.toml`` beside ``step-NNNNNNN`` checkpoints): what ``--force`` never replaces,
    though mmf wrote it."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / name).exists() for name in TRAINING_STATE_FILES) or is_run_dir(path)


def check_output(out: Path, overwrite: bool = False, is_ours: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse, with one line, an ``out`` that cannot be written or replaced. Cheap: commands call it before
    any work, and ``atomic_directory`` calls it again before it writes. Without ``is_ours`` (the rule of every
    command's ``--force``) a training checkpoint or run is refused too (``holds_training_state``); a writer that
    may replace one (a training checkpoint rewritten at its own step) passes ``is_ours``."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        what = "a symbolic link" if out.is_symlink() else "a file"
        raise MMFError(f"--out {out} is {what}, not a directory that mmf wrote; --force replaces only mmf outputs, "
                       "so choose another --out (nothing was changed)")
    if out.exists():
        if not overwrite:
            raise MMFError(f"{out} already exists; choose another --out or pass --force to replace it")
        if is_ours is None and holds_training_state(out):
            raise MMFError(f"--out {out} holds a training checkpoint or run (optimiser and trainer state that --resume "
                           "needs); --force does not replace one, so delete it yourself or choose another --out "
                           "(nothing was changed)")
        if not (is_ours or written_by_mmf)(out):
            raise MMFError(f"--out {out} is a directory that mmf did not write (no config.json with mmf_version, "
                           "mmf_onnx.json or fpga manifest.json); --force replaces only mmf outputs, so choose "
                           "another --out or empty it yourself (nothing was changed)")
    check_parent_writable(out, "--out", "choose another --out")


def check_parent_writable(path: Path, option: str, fix: str) -> None:
    """The nearest existing folder above ``path`` (missing ones are created later) must be a writable folder."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MMFError(f"{option} {path}: {parent} is a file, not a directory; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MMFError(f"{option} {path}: {parent} is not writable; {fix}")

def check_free_space(out: Path, need_bytes: Optional[int]) -> None:
    """Refuse before writing when the file system of ``out`` has less than ``need_bytes`` free."""
    if not need_bytes:
        return
    free = _free_bytes(Path(out))
    if free is not None and free < need_bytes:
        raise MMFError(f"no space left on device for {out}: it needs about {human_bytes(need_bytes)} but only "
                       f"{human_bytes(free)} is free; free {human_bytes(need_bytes - free)} or choose another --out")


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) reports a full disk or an exceeded quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(out: Path, need_bytes: Optional[int] = None, option: str = "--out") -> DiskFullError:
    """The one-line error for a full disk while writing ``out`` (after its partial output was removed)."""
    free = _free_bytes(Path(out))
    have = f"{human_bytes(free)} free now" if free is not None else "free space unknown"
    if need_bytes and free is not None and need_bytes > free:
        fix = f"free {human_bytes(need_bytes - free)} (it needs about {human_bytes(need_bytes)}, {have})"
    else:
        fix = f"free space ({have}{f', it needs about {human_bytes(need_bytes)}' if need_bytes else ''})"
    return DiskFullError(f"no space left on device writing {out}: {fix} or choose another {option}; "
                         "the partial output was removed and the input is untouched")


def _free_bytes(out: Path) -> Optional[int]:
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_output_file(path: Path, option: str = "--json-out") -> None:
    """Refuse, before any work, a file output that cannot be written: a directory, or a parent that is a file
    or not writable. (An existing file is replaced: that is what naming it asks for.)"""
    path = Path(path)
    if path.is_dir():
        raise MMFError(f"{option} {path} is a directory; give a file name such as {path / 'report.json'}")
    check_parent_writable(path, option, "choose another path")


def write_text_output(path: Path, text: str | bytes, option: str = "--json-out") -> Path:
    """Write ``text`` (UTF-8; bytes as they are) to ``path`` atomically (a temporary name beside it, then one
    rename), creating parent folders; the file gets the umask's mode like any ``open``, a full disk is one
    line, and on any error ``path`` is untouched."""
    path = Path(path)
    check_output_file(path, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 & ~umask
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path, option=option) from None
        raise
    return path


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False, is_ours: Optional[Callable[[Path], bool]] = None,
                     need_bytes: Optional[int] = None):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    ``overwrite`` replaces an existing ``out`` only if ``is_ours(out)`` (default ``written_by_mmf``).
    Modes follow the umask (``apply_umask``). On any error the temporary directory is removed and ``out``
    is untouched; a full disk becomes one ``MMFError`` line. ``need_bytes``, when known, is checked against
    the free space first and named in that message.
    """
    out = Path(out)
    check_output(out, overwrite, is_ours)
    check_free_space(out, need_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(out, need_bytes) from None
        raise
    try:
        yield tmp
        apply_umask(tmp)
        if out.exists():
            check_output(out, overwrite, is_ours)  # it may have appeared while the output was written
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # replaces the empty directory just made
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, MMFError) and is_disk_full(e):
            raise disk_full_error(out, need_bytes) from None
        raise
