"""The native CPU kernel is the default wherever a CPU decodes or scores (issue 18 item 4): mmf.load_model on
the CPU (packed and frozen), `mmf generate` (a float checkpoint frozen at load), `mmf eval` (the inference form,
whose loss equals the training form's to rounding), and `--threads` on each command. Each test counts the calls
that reach kernels/cpu_ternary.py, so that a path which silently fell back to torch fails."""

from __future__ import annotations

import json

import pytest
import torch

import mmf
from conftest import main_in_process, median_rel_err, small_model
from mmf import kernels
from mmf.kernels import cpu_decode
from mmf.kernels import cpu_ternary as ct

pytestmark = pytest.mark.skipif(not ct.available(), reason="native CPU kernel unavailable")


@pytest.fixture
def native_calls(monkeypatch):
    """Count the calls of the native kernel (the reference is un-forced: CI also runs with MMF_FORCE_REFERENCE=1),
    and give torch's thread count back after a test that set it."""
    calls = []
    native = ct.bitlinear_i2
    monkeypatch.setattr(ct, "bitlinear_i2", lambda *a, **kw: calls.append(a[2].shape) or native(*a, **kw))
    step = cpu_decode.step
    monkeypatch.setattr(cpu_decode, "step", lambda *a, **kw: calls.append("step") or step(*a, **kw))
    prev, threads = kernels._FORCE_REFERENCE, torch.get_num_threads()
    kernels.force_reference(False)
    yield calls
    kernels.force_reference(prev)
    torch.set_num_threads(threads)




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A float (latent) MatMul-free checkpoint with a tokenizer, and its `mmf pack` (i2)."""
    from mmf.converters.packing import pack_checkpoint

    root = tmp_path_factory.mktemp("wiring")
    model = small_model("mmf", seed=4, intermediate_size=90)
    mmf.save_checkpoint(model, root / "float", tokenizer=mmf.ByteTokenizer())
    pack_checkpoint(root / "float", root / "packed")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root


@pytest.mark.parametrize("kind", ["packed", "frozen"])
def test_load_model_on_cpu_runs_the_native_kernel(checkpoints, native_calls, kind):
    """Every BitLinear of a packed or frozen model loaded on the CPU goes through the native kernel (one call
    each per forward), and the logits are the torch reference path's."""
    model = mmf.load_model(checkpoints / ("packed" if kind == "packed" else "float"), device="cpu",
                           frozen=kind == "frozen")
    n_bitlinears = 6 * model.config.num_hidden_layers + 1
    ids = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids).logits
        assert len(native_calls) == n_bitlinears, "a BitLinear did not run the native kernel"
        kernels.force_reference(True)
        ref = model(ids).logits
    assert len(native_calls) == n_bitlinears  # the reference did not call it
    assert median_rel_err(logits, ref) <= 1e-6


def test_generate_on_cpu_freezes_a_float_checkpoint_and_runs_native(checkpoints, native_calls, capsys):
    """`mmf generate` on the CPU from a float checkpoint: frozen at load, so every token runs the native kernel
    (the prompt through the native BitLinear, each decode step as one native whole-step call);
    `--threads 1` sets torch's (and so the kernel's) thread count."""
    code, out, err = main_in_process(capsys, "generate", checkpoints / "float", "-p", "Hello", "-n", "4", "-t", "0",
                           "--threads", "1")
    assert code == 0, err
    assert out.startswith("Hello")
    cfg = mmf.load_model(checkpoints / "float").config
    per_call = 6 * cfg.num_hidden_layers + 1
    # the prompt's prefill, then a native step per new token but the last
    assert len(native_calls) == per_call + 3 and native_calls[per_call:] == ["step"] * 3
    assert torch.get_num_threads() == 1


def test_eval_on_cpu_scores_the_inference_form_natively(checkpoints, native_calls, capsys, monkeypatch):
    """`mmf eval` on the CPU scores the frozen form through the native kernel; its loss is the training
    form's up to the order of fp32 operations (docs/reference-semantics.md), far below 1e-5 relative."""
    from mmf import evaluate

    code, out, err = main_in_process(capsys, "eval", checkpoints / "float", "--data", checkpoints / "text.txt",
                           "--seq-len", "64", "--batch-size", "4", "--threads", "1", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert native_calls and torch.get_num_threads() == 1
    load = evaluate.load_model
    seen = []

    def latent(*a, frozen=False, **kw):  # the training form, as eval scored before
        seen.append(frozen)
        return load(*a, **kw)

    monkeypatch.setattr(evaluate, "load_model", latent)
    n = len(native_calls)
    want = evaluate.evaluate_checkpoint(checkpoints / "float", [str(checkpoints / "text.txt")], seq_len=64,
                                        batch_size=4)
    assert seen == [True] and len(native_calls) == n  # eval asked for the frozen form; the latent one ran in torch
    assert got["tokens"] == want["tokens"] > 1000
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (got["loss"], want["loss"])


@pytest.mark.parametrize("command", ["generate", "eval", "bench"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_one_line(checkpoints, capsys, monkeypatch, command, value):
    """`--threads N` with N < 1 is one line naming the fix, exit 2, before any work."""
    from mmf.bench import model_bench

    monkeypatch.setattr(model_bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking --threads"))
    args = {"generate": ["generate", checkpoints / "float", "-p", "Hi", "-n", "2"],
            "eval": ["eval", checkpoints / "float", "--data", checkpoints / "text.txt"],
            "bench": ["bench", "--model", "tiny", "--device", "cpu"]}[command]
    threads = torch.get_num_threads()
    code, out, err = main_in_process(capsys, *args, "--threads", value)
    assert code == 2 and out == "", (code, out, err)
    assert err == f"mmf: error: --threads {value}: give a number of CPU threads >= 1, or leave it out for torch's " \
                  f"default ({threads} here)\n"
    assert torch.get_num_threads() == threads


def test_generate_onnx_threads_reach_onnx_runtime(checkpoints, capsys, monkeypatch, tmp_path):
    """`mmf generate --onnx DIR --threads 2` gives ONNX Runtime 2 intra-op threads (and torch 2)."""
    pytest.importorskip("onnxruntime")
    from mmf import onnx_runtime
    from mmf.converters.onnx_export import export_onnx

    export_onnx(checkpoints / "packed", tmp_path / "onnx", check=False)
    seen = []
    real = onnx_runtime.OnnxCausalLM

    class Recording(real):
        def __init__(self, *a, threads=0, **kw):
            seen.append(threads)
            super().__init__(*a, threads=threads, **kw)

    monkeypatch.setattr(onnx_runtime, "OnnxCausalLM", Recording)
    threads = torch.get_num_threads()
    try:
        code, out, err = main_in_process(capsys, "generate", "--onnx", tmp_path / "onnx", "-p", "Hi", "-n", "2", "-t", "0",
                               "--threads", "2")
        assert code == 0, err
        assert seen == [2] and torch.get_num_threads() == 2 and out.startswith("Hi")
    finally:
        torch.set_num_threads(threads)


def test_freeze_under_inference_mode_then_decode_on_the_cpu():
    """A model frozen inside torch.inference_mode() (its codes are inference tensors, which have no version
    counter) still decodes through the native path's packed-codes cache."""
    model = small_model("mmf")
    ids = torch.randint(0, 259, (1, 5))
    with torch.inference_mode():
        model.freeze()
        out = model(ids)
        again = model(ids)
    assert torch.equal(out.logits, again.logits) and torch.isfinite(out.logits).all()


def test_generate_ids_runs_one_forward_per_generated_token_but_the_last():
    """n new tokens need the prefill and n - 1 decode steps: the last token's successor is never computed."""
    from mmf.generate import generate_ids

    model = small_model("mmf").freeze()
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    try:
        new = generate_ids(model, [1, 2, 3], max_new_tokens=4)
    finally:
        hook.remove()
    assert len(new) == 4 and calls == [3, 1, 1, 1]


def test_frozen_forward_runs_torch_on_one_thread_and_the_kernel_on_torchs_count(monkeypatch):
    """A frozen model's CPU forward sets torch to one thread (its OpenMP workers would spin on the kernel's cores)
    and hands torch's count to the kernel; the count is restored after, and the logits are the reference's."""
    seen = []
    native = ct.bitlinear_i2
    monkeypatch.setattr(ct, "bitlinear_i2", lambda *a, **kw: seen.append((torch.get_num_threads(), ct.default_threads()))
                        or native(*a, **kw))
    prev_force, prev_threads = kernels._FORCE_REFERENCE, torch.get_num_threads()
    kernels.force_reference(False)
    try:
        torch.manual_seed(3)
        model = small_model().freeze()
        ids = torch.randint(0, model.config.vocab_size, (2, 7))
        torch.set_num_threads(2)
        with torch.no_grad():
            got = model(ids).logits
        assert seen and all(s == (1, 2) for s in seen)
        assert torch.get_num_threads() == 2 and ct.default_threads() == 2
        kernels.force_reference(True)
        with torch.no_grad():
            want = model(ids).logits
        assert median_rel_err(got, want) <= 1e-6
    finally:
        kernels.force_reference(prev_force)
        torch.set_num_threads(prev_threads)


def test_generate_speed_bench_times_both_paths(checkpoints, tmp_path, capsys):
    """bench/generate_speed.py times mmf generate's loop natively and on the reference, in one process, and the
    greedy tokens agree."""
    from mmf.bench import generate_speed

    prev = kernels._FORCE_REFERENCE
    kernels.force_reference(False)
    try:
        assert generate_speed.main([str(checkpoints / "float"), "--new-tokens", "3", "--repeats", "1",
                                    "--json-out", str(tmp_path / "g.json")]) == 0
    finally:
        kernels.force_reference(prev)
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["same_tokens"] is True and res["protocol"]["new_tokens"] == 3
    assert res["native"]["seconds"] > 0 and res["reference"]["seconds"] > 0
    assert res["speedup"] == pytest.approx(res["reference"]["seconds"] / res["native"]["seconds"])
    assert "native is" in capsys.readouterr().out
