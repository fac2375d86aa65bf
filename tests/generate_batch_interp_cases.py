"""`mmf generate`'s batched decode through GraphDecoder (its Triton kernels, no CUDA graph on the CPU),
run under TRITON_INTERPRET=1 by ``test_generate_batch.py::test_graph_decoder_batch_under_interpreter``."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the wrapper
    pytest.skip("run through test_generate_batch.py (needs TRITON_INTERPRET=1)", allow_module_level=True)


def test_graph_batch_equals_each_prompt_alone(monkeypatch):
    """Prompts of unequal lengths, each prefilled alone and stacked into GraphDecoder's state, decode to each
    prompt's own greedy tokens; at a limit of 2 rows (kept small for the interpreter), 3 prompts run as a
    full chunk and a padded one."""
    from conftest import small_model

    import mmf.generate as gen

    monkeypatch.setattr(gen, "graph_batch_limit", lambda: 2)
    model = small_model("mmf", seed=6, intermediate_size=90).freeze()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (2, 5, 3)]
    got = gen.generate_batch_ids(model, prompts, 2, graph=True)  # one decode step per chunk
    assert got == [gen.generate_ids(model, p, 2) for p in prompts]
