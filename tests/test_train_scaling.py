"""bench/train_scaling.py (``mmf bench --train --nproc``): two gloo processes on the CPU at a tiny shape,
the memory prediction that refuses a 13b run before launch, and the one-line refusals."""

from __future__ import annotations

import sys

import pytest
import torch

from mmf.bench import train_scaling as ts
from mmf.errors import MMFError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}


def test_two_gloo_processes_follow_one_process_and_report_speed_and_memory(tmp_path):
    res = ts.run_scaling([1, 2], "tiny", "ddp", "cpu", batch=2, seq_len=32, steps=4, warmup=1, overrides=TINY,
                         lr=3e-3, progress=lambda m: None)
    s = {r["nproc"]: r for r in res["summary"]}
    assert sorted(s) == [1, 2] and res["env"]["backend"] == "gloo"
    runs = {r["nproc"]: r for r in res["runs"]}
    assert runs[2]["global_batch"] == 4 and runs[1]["global_batch"] == 2
    assert res["references"][0]["accum"] == 2 and res["references"][0]["global_batch"] == 4
    # the same global batch: step 1 to float rounding, later steps within the bound of test_train's gloo test
    assert s[2]["loss_first_rel_diff_vs_one_process"] <= 1e-6
    assert s[2]["loss_max_rel_diff_vs_one_process"] <= 2e-3
    ref = res["references"][0]["losses"]
    assert len(ref) == 4 and len(set(ref)) > 1  # real, changing losses (not a constant)
    assert s[1]["scaling_efficiency"] == 1.0 and 0 < s[2]["scaling_efficiency"]
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in res["summary"])
    assert [m["rank"] for m in runs[2]["memory_per_rank"]] == [0, 1]
    assert all(m["peak_bytes"] > 50e6 and "RSS" in m["peak_kind"] for m in runs[2]["memory_per_rank"])
    ts.print_results(res)
    png = tmp_path / "scaling.png"
    ts.plot_scaling(res, png)
    assert png.stat().st_size > 1000


def test_13b_fsdp_is_predicted_and_refused_when_it_cannot_fit():
    budget = 0.8 * 141e9  # an H200's 80 %
    # FSDP shards the 16 bytes per parameter: 8 ranks fit, 2 do not (and the fix names the smallest count that fits)
    need8 = ts.check_fits("13b", {}, 1, 2048, "cuda", 8, "fsdp", budget)
    need4 = ts.check_fits("13b", {}, 1, 2048, "cuda", 4, "fsdp", budget)
    assert need8 < need4 < budget
    with pytest.raises(MMFError, match=r"13b fsdp on 2 process.*--strategy fsdp --nproc 4"):
        ts.check_fits("13b", {}, 1, 2048, "cuda", 2, "fsdp", budget)
    with pytest.raises(MMFError, match=r"13b ddp on 8 process.*--strategy fsdp --nproc 8"):
        ts.check_fits("13b", {}, 1, 2048, "cuda", 8, "ddp", budget)  # DDP keeps every parameter on every GPU
    assert ts.check_fits("1.3b", {}, 4, 2048, "cuda", 8, "ddp", budget) < budget


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    import mmf.bench

    monkeypatch.setattr(mmf.bench, "resolve_device", lambda d: ("cuda:0", "--device cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MMFError, match=r"--nproc 8 but 1 GPU\(s\) are visible; give at most 1"):
        ts.run_scaling([1, 8], "1.3b", device="cuda")


@pytest.mark.parametrize("args, msg", [(["--train", "--nproc", "0"], "--nproc 0: give process counts >= 1"),
                                       (["--nproc", "2"], "--nproc and --strategy: for --train only"),
                                       (["--train", "--nproc", "2", "--strategy", "zero"], "--strategy zero: use ddp"),
                                       (["--train", "--nproc", "2", "--model", "370m,1.3b"], "one size at a time")])
def test_bad_options_are_one_line(monkeypatch, capsys, args, msg):
    from mmf.cli.main import main

    monkeypatch.setattr(sys, "argv", ["mmf", "bench", *args, "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code != 0 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
