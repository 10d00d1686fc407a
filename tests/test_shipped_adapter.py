"""The adapter shipped for the embedded model loads, matches its base, and routes per step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from layerroute import LayerRouteModel
from layerroute.loading import default_adapter_dir
from layerroute.steps import tokenize_step, trace_steps
from layerroute.traces import read_traces

CORPUS = Path(__file__).resolve().parents[1] / "training" / "data" / "corpus"


@pytest.mark.slow
def test_shipped_adapter_routes_each_step_on_its_own(smollm2):
    base, tokenizer = smollm2
    model = LayerRouteModel.from_pretrained(default_adapter_dir(), base_model=copy.deepcopy(base)).eval()
    assert model.num_trainable_parameters() == 938_910  # 921,600 LoRA + 30 x 577 router
    steps = [s for t in read_traces(CORPUS / "test.jsonl.gz").traces[:40] for s in trace_steps(t)][:24]
    routes = set()
    with torch.no_grad():
        for step in steps:
            example = tokenize_step(step, tokenizer, 2048, 64)
            keep = model(torch.tensor([example.context_ids])).keep[0]
            routes.add(tuple(i for i in range(model.num_layers) if not keep[i]))
    assert len(routes) > 1, "the shipped routers should decide per step, not apply one fixed pattern"
