"""The native whole-step CPU decode (kernels/cpu_decode.py, mmf_hgrn_step in kernels/cpu/ternary_cpu.c) against
its reference, the model's eager forward under MMF_FORCE_REFERENCE (issue 18 items 1 and 2): odd shapes, 1-3
rows, 1 and 2 threads, every instruction path this machine has, lower bounds on and off, tied and untied heads,
int8 codes and i2 bytes; and the cases where the eager path must run instead."""

from __future__ import annotations

import pytest
import torch

from conftest import median_rel_err, small_model
from mmf import kernels
from mmf.kernels import cpu_decode
from mmf.kernels import cpu_ternary as ct
from mmf.models import FrozenBitLinear
from mmf.ternary_codes import pack_i2

pytestmark = pytest.mark.skipif(not ct.available(), reason="native CPU kernel unavailable")


@pytest.fixture
def native(monkeypatch):
    """The native paths un-forced (CI also runs with MMF_FORCE_REFERENCE=1); tiny shapes on several threads;
    the native steps counted; torch's threads, the path and the forcing restored after."""
    calls = []
    step = cpu_decode.step
    monkeypatch.setattr(cpu_decode, "step", lambda *a, **kw: calls.append(a[1].shape) or step(*a, **kw))
    prev, threads = kernels._FORCE_REFERENCE, torch.get_num_threads()
    kernels.force_reference(False)
    ct.set_min_parallel_bytes(64)
    yield calls
    ct.set_min_parallel_bytes(64 * 1024)
    ct.set_isa(None)
    kernels.force_reference(prev)
    torch.set_num_threads(threads)


def _decode(model, ids, steps, reference):
    """Prefill ids[:, :-steps], then `steps` single-token steps: the logits and states of each step."""
    kernels.force_reference(reference)
    try:
        with torch.no_grad():
            out = model(ids[:, :-steps])
            got = []
            for t in range(ids.shape[1] - steps, ids.shape[1]):
                out = model(ids[:, t:t + 1], out.cache)
                got.append((out.logits, out.cache.states))
    finally:
        kernels.force_reference(False)
    return got


def _packed(model):
    """The same model with every FrozenBitLinear holding i2 bytes instead of int8 codes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBitLinear):
                setattr(parent, name, FrozenBitLinear(child.in_features, child.out_features, weight_scale=child.weight_scale,
                                                      norm_weight=child.norm.weight, packed=pack_i2(child.codes)))
    return model


CASES = [  # (config overrides, rows, threads, packed)
    (dict(), 1, 1, False),
    (dict(hidden_size=72, intermediate_size=200, num_hidden_layers=3), 2, 2, False),
    (dict(hidden_size=37, intermediate_size=45), 3, 2, True),
    (dict(use_lower_bound=False, tie_word_embeddings=True), 1, 2, True),
]


@pytest.mark.parametrize("isa", ct.supported_isas() if ct.available() else [])
@pytest.mark.parametrize("over,rows,threads,packed", CASES)
def test_native_step_equals_the_eager_reference(native, isa, over, rows, threads, packed):
    torch.manual_seed(hash((isa, rows, threads)) % 1000)
    model = small_model(seed=rows, **over).freeze()
    if packed:
        model = _packed(model)
    ids = torch.randint(0, model.config.vocab_size, (rows, 6))
    ct.set_isa(isa)
    torch.set_num_threads(threads)
    want = _decode(model, ids, 3, reference=True)
    got = _decode(model, ids, 3, reference=False)
    assert len(native) == 3 and all(s == (rows, 1) for s in native)
    for (gl, gs), (wl, ws) in zip(got, want):
        assert gl.shape == wl.shape == (rows, 1, model.config.vocab_size)
        assert median_rel_err(gl, wl) <= 1e-6
        assert all(median_rel_err(a, b) <= 1e-6 for a, b in zip(gs, ws))
        assert torch.equal(gl.argmax(-1), wl.argmax(-1))


def test_first_token_without_a_cache_and_the_plan_follows_weight_changes(native):
    model = small_model(seed=5).freeze()
    ids = torch.randint(0, model.config.vocab_size, (2, 1))
    with torch.no_grad():
        a = model(ids).logits
        kernels.force_reference(True)
        ref = model(ids).logits
        kernels.force_reference(False)
        assert median_rel_err(a, ref) <= 1e-6 and len(native) == 1
        model.model.layers[0].attn.o_proj.norm.weight.mul_(3.0)  # in place: the plan must notice
        b = model(ids).logits
        kernels.force_reference(True)
        ref_b = model(ids).logits
    assert median_rel_err(b, ref_b) <= 1e-6 and not torch.allclose(a, b)


def test_models_it_cannot_read_run_the_eager_forward(native, monkeypatch):
    """A BitLinear with a bias, bf16 norm weights, or the reference forced: the eager forward, same logits."""
    for change in ("bias", "bf16", "forced"):
        model = small_model(seed=7).freeze()
        if change == "bias":
            lin = model.model.layers[1].mlp.down_proj
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features), requires_grad=False)
        elif change == "bf16":
            model.model.norm.weight.data = model.model.norm.weight.data.bfloat16()
        ids = torch.randint(0, model.config.vocab_size, (1, 4))
        native.clear()
        kernels.force_reference(change == "forced")
        with torch.no_grad():
            out = model(ids[:, :3])
            model(ids[:, 3:], out.cache)
        kernels.force_reference(False)
        if change == "forced":
            assert not native
        else:
            assert cpu_decode.plan_for(model, FrozenBitLinear) is None


def test_out_of_range_token_is_an_error_not_a_read(native):
    model = small_model(seed=8).freeze()
    with torch.no_grad(), pytest.raises(IndexError, match="token ids must be in"):
        model(torch.tensor([[model.config.vocab_size]]))
