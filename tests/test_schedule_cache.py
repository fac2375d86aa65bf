"""The on-disk cache of tuned kernel schedules (kernels/schedule_cache.py)."""

from __future__ import annotations

import json

from mmf.kernels import schedule_cache as sc


def test_store_and_lookup_by_context(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "schedules.json"
    monkeypatch.setenv("MMF_SCHEDULE_CACHE", str(path))
    sc._MEMORY.clear()
    key = ("gemv", 1, 5120, 5120, 3, 1, 0, False, "torch.float16")
    assert sc.lookup("gemv", key, "H100 sm90 a") is None
    sc.store("gemv", {key: (32, 16, 1)}, "H100 sm90 a")
    assert sc.lookup("gemv", key, "H100 sm90 a") == (32, 16, 1)
    assert sc.lookup("gemv", key, "H200 sm90 a") is None  # another GPU, library version or kernel source
    assert sc.lookup("gemm", key, "H100 sm90 a") is None
    sc._MEMORY.clear()  # a new process reads the file
    assert sc.lookup("gemv", key, "H100 sm90 a") == (32, 16, 1)
    # a second writer's entries are kept (the file is re-read before each write)
    data = json.loads(path.read_text())
    data["other ctx"] = {"gemm": {"k": [1, 2]}}
    path.write_text(json.dumps(data))
    sc.store("gemv", {"k2": (8, 8, 1)}, "H100 sm90 a")
    data = json.loads(path.read_text())
    assert data["other ctx"] == {"gemm": {"k": [1, 2]}} and data["H100 sm90 a"]["gemv"]["k2"] == [8, 8, 1]
    assert not [p for p in path.parent.iterdir() if p.name != "schedules.json"]  # no temporary file left


def test_corrupt_file_is_empty_and_replaced(tmp_path, monkeypatch):
    path = tmp_path / "schedules.json"
    path.write_text("{not json")
    monkeypatch.setenv("MMF_SCHEDULE_CACHE", str(path))
    sc._MEMORY.clear()
    assert sc.lookup("gemv", "k", "c") is None
    sc.store("gemv", {"k": (4, 4, 2)}, "c")
    assert json.loads(path.read_text()) == {"c": {"gemv": {"k": [4, 4, 2]}}}


def test_cache_off(tmp_path, monkeypatch):
    path = tmp_path / "schedules.json"
    monkeypatch.setenv("MMF_SCHEDULE_CACHE", str(path))
    sc._MEMORY.clear()
    with sc.disabled():
        sc.store("gemv", {"k": (4, 4, 2)}, "c")
        assert sc.lookup("gemv", "k", "c") is None
    assert not path.exists() and sc.ENABLED
    monkeypatch.setenv("MMF_SCHEDULE_CACHE", "0")
    assert sc.cache_path() is None
    monkeypatch.delenv("MMF_SCHEDULE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sc.cache_path() == tmp_path / "xdg" / "mmf" / "schedules.json"


def test_pick_times_once_then_reads_back(tmp_path, monkeypatch):
    """``pick``: the first call times every candidate (one that fails is skipped) and stores the
    fastest; a later call reads it back without timing; a stored schedule the kernel no longer
    offers is timed afresh; if every candidate fails, the first is used and nothing is stored."""
    path = tmp_path / "schedules.json"
    monkeypatch.setenv("MMF_SCHEDULE_CACHE", str(path))
    monkeypatch.setattr(sc, "context", lambda device, source: "GPU sm90 src")
    sc._MEMORY.clear()
    ms = {(8, 4, 2): 3.0, (16, 8, 1): 1.5, (4, 4, 4): 2.0}
    timed = []

    def time_of(cfg):
        timed.append(cfg)
        if cfg == (32, 16, 1):
            raise RuntimeError("out of resources")
        return ms[cfg]

    cands = [(8, 4, 2), (32, 16, 1), (16, 8, 1), (4, 4, 4)]
    best, ranking = sc.pick("gemv", "k", None, "src.py", cands, time_of)
    assert best == (16, 8, 1) and ranking == [(16, 8, 1), (4, 4, 4), (8, 4, 2)] and timed == cands
    timed.clear()
    sc._MEMORY.clear()  # a new process
    assert sc.pick("gemv", "k", None, "src.py", cands, time_of) == ((16, 8, 1), []) and not timed
    assert sc.pick("gemv", "k", None, "src.py", [(8, 4, 2), (4, 4, 4)], time_of) == ((4, 4, 4), [(4, 4, 4), (8, 4, 2)])
    assert sc.pick("gemm", "j", None, "src.py", [(32, 16, 1)], time_of) == ((32, 16, 1), [])
    assert sc.lookup("gemm", "j", "GPU sm90 src") is None
