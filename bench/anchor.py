"""The llama.cpp TQ2_0 anchor (issue 18 item 6), run from mmf's environment.

``bench/llamacpp_anchor.py`` needs numpy, gguf and llama-cpp-python, which live in a separate virtual environment
(its docstring has the install commands). ``run_llamacpp_anchor`` runs that script with the separate environment's
interpreter in a subprocess and returns the JSON document it writes, so that ``mmf bench --device cpu`` can show
llama.cpp as one more row of the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from mmf.errors import MMFError

SCRIPT = Path(__file__).with_name("llamacpp_anchor.py")
DEFAULT_VENV_PYTHON = "/tmp/llamacpp-venv/bin/python"


class AnchorError(MMFError):
    """The llama.cpp anchor could not run (interpreter, dependency or measurement)."""


def run_llamacpp_anchor(python: str, threads: Union[int, Sequence[int]] = (1, 2), size: str = "1.3b",
                        prompt_len: int = 8, new_tokens: int = 32, repeat: int = 3, prefill_len: int = 128,
                        prefill_repeat: int = 3, seed: int = 0, gguf: Optional[str] = None,
                        timeout_s: Optional[float] = 3600) -> dict:
    """Run ``bench/llamacpp_anchor.py`` with the interpreter ``python`` (the separate environment's, e.g.
    ``/tmp/llamacpp-venv/bin/python``) at the thread count(s) ``threads`` and return its JSON document.

    Raises ``AnchorError`` (one line) when the interpreter is missing, lacks llama_cpp / gguf / numpy (the line says
    how to install them), the script fails, or it runs past ``timeout_s``.
    """
    counts = [threads] if isinstance(threads, int) else list(threads)
    if not counts or any(not isinstance(t, int) or t < 1 for t in counts):
        raise AnchorError(f"threads must be one or more counts >= 1, got {threads!r}")
    exe = shutil.which(python)
    if exe is None:
        raise AnchorError(f"llama.cpp anchor: interpreter {python} not found or not executable; create it with: "
                          f"python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install numpy gguf "
                          f"llama-cpp-python (see {SCRIPT.name})")
    with tempfile.TemporaryDirectory(prefix="mmf_anchor_") as tmp:
        out = os.path.join(tmp, "anchor.json")
        cmd = [exe, str(SCRIPT), "--size", size, "--threads", *map(str, counts), "--prompt-len", str(prompt_len),
               "--new-tokens", str(new_tokens), "--repeat", str(repeat), "--prefill-len", str(prefill_len),
               "--prefill-repeat", str(prefill_repeat), "--seed", str(seed), "--json-out", out]
        if gguf:
            cmd += ["--gguf", str(gguf)]
        try:
            proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AnchorError(f"llama.cpp anchor: ran past {timeout_s:g} s; pass a longer timeout or fewer "
                              "--new-tokens / --repeat") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("llamacpp_anchor: error:")), None)
            if why is not None:
                why = why[len("llamacpp_anchor: error:"):].strip()
            else:
                why = f"exit status {proc.returncode}" + (f": {lines[-1]}" if lines else "")
            raise AnchorError(f"llama.cpp anchor ({python}): {why}")
        try:
            with open(out) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise AnchorError(f"llama.cpp anchor: the script exited 0 but wrote no readable JSON ({e})") from None
