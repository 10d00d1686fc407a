"""A step routed and prefilled alone, then decoded in a group (``prefill_step`` + ``ChatEngine.generate(prefills=...)``)
executes and counts exactly what the same step generated alone (batch of one) does: the same greedy tokens, the same
route FLOP numbers, and no block forwarding any prompt position twice."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from transformers import TextStreamer

from layerroute.chat import ChatEngine, prefill_step
from layerroute.model import LayerRouteModel

PROMPTS = [f"{i} " + word * 4 for i, word in enumerate(
    ["zebra", "42 + 17", "Bonjour", "<tool>", "SELECT *", "def f():", "!!!", "weather", "Oslo", "plan it"])]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    return ChatEngine.load(tiny_chat_dir)


@contextmanager
def executed(model: LayerRouteModel):
    """Counts what really runs: query positions (rows x tokens) each decoder block processes, by block index, and
    positions whose logits the LM head computes (under ``"lm_head"``)."""
    work: Counter = Counter()
    handles = []
    for routed in model.blocks:
        def count(module, args, kwargs, index=routed.layer_idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            work[index] += hidden.shape[0] * hidden.shape[1]
        handles.append(routed.block.register_forward_pre_hook(count, with_kwargs=True))

    def count_head(module, args):
        hidden = args[0]
        work["lm_head"] += hidden.shape[0] * (hidden.shape[1] if hidden.dim() > 2 else 1)
    handles.append(model.base_model.get_output_embeddings().register_forward_pre_hook(count_head))
    try:
        yield work
    finally:
        for handle in handles:
            handle.remove()


def test_a_grouped_prefilled_row_executes_and_counts_what_batch_one_does(engine, set_routers):
    set_routers(0.0, weight_std=200.0, pooling="mean")  # decisions that depend on the whole prompt
    steps = [engine.prepare([{"role": "user", "content": p}], max_tokens=MAX_TOKENS) for p in PROMPTS]
    alone, alone_work = [], []
    for step in steps:
        with executed(engine.model) as work:
            alone.append(engine.generate([step])[0])
        alone_work.append(work)

    groups: dict[frozenset, list[int]] = {}
    prefills = {}
    prefill_work = []
    for index, step in enumerate(steps):
        with executed(engine.model) as work:
            prefills[index] = prefill_step(engine, step)
        prefill_work.append(work)
        groups.setdefault(prefills[index].skip, []).append(index)
    assert any(len(rows) > 1 for rows in groups.values()), "some steps should share a skip set"
    assert len(groups) > 1, "routes should differ between prompts"

    for skip, rows in groups.items():
        with executed(engine.model) as work:
            answers = engine.generate([steps[i] for i in rows], prefills=[prefills[i] for i in rows])
        decoded = max(answer.completion_tokens for answer in answers)  # a batch decodes until its last row ends
        expected: Counter = Counter()
        for index, answer in zip(rows, answers):
            one = alone[index]
            # the same greedy tokens and the same route numbers as the step generated alone
            assert answer.text == one.text and answer.completion_tokens == one.completion_tokens
            for key in ("skipped_layers", "num_layers", "flops_total", "flops_skipped", "flops_skipped_frac"):
                assert answer.route[key] == one.route[key], key
            assert sorted(skip) == one.route["skipped_layers"]
            # what ran for this row: what batch-1 ran, plus the decode positions a batch spends on a row that
            # ended before its batch-mates
            for key, count in alone_work[index].items():
                expected[key] += count + (decoded - one.completion_tokens) * (count > 0)
        ran: Counter = Counter()
        for index in rows:
            ran.update(prefill_work[index])
        ran.update(work)
        assert dict(ran) == dict(expected), "a prefilled group must run no prompt position twice"


def test_a_prefilled_generate_continues_like_a_plain_one(engine, set_routers, capsys):
    """At the model level: scores, sequences, streaming and the route of ``generate(prefilled=...)`` are the ones a
    plain ``generate`` gives the same prompt under the same decisions."""
    set_routers(0.0, weight_std=200.0, pooling="mean")
    model, tokenizer = engine.model, engine.tokenizer
    step = engine.prepare([{"role": "user", "content": PROMPTS[3]}], max_tokens=MAX_TOKENS)
    prefill = prefill_step(engine, step)
    input_ids = step.prompt_ids[None]
    settings = {"max_new_tokens": MAX_TOKENS, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                "return_dict_in_generate": True, "output_scores": True, "pad_token_id": engine.pad_token_id}
    plain = model.generate(input_ids, forced_skip=prefill.skip, streamer=TextStreamer(tokenizer), **settings)
    plain_route, plain_streamed = model.last_route, capsys.readouterr().out
    continued = model.generate(input_ids, forced_skip=prefill.skip, prefilled=prefill.cache,
                               streamer=TextStreamer(tokenizer), **settings)
    assert torch.equal(continued.sequences, plain.sequences)
    for ours, theirs in zip(continued.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert capsys.readouterr().out == plain_streamed
    assert model.last_route == plain_route
    # the cache now holds the prompt and every generated token but the last, in the blocks the step keeps
    kept = [i for i in range(model.num_layers) if i not in prefill.skip]
    assert prefill.cache.get_seq_length(kept[0]) == continued.sequences.shape[1] - 1


def test_a_row_that_a_stop_string_ends_counts_what_it_generated(engine, set_routers):
    """A row that ends on a stop string while its batch goes on is padded by HF, with a padding token that is also an
    end token here: neither its answer nor its route may count that padding."""
    set_routers(4.0)  # every row keeps every block: one group
    free = [engine.generate([engine.prepare([{"role": "user", "content": p}], max_tokens=8)])[0] for p in PROMPTS]
    found = None
    for a, b in ((a, b) for a in range(len(free)) for b in range(len(free)) if free[a].text != free[b].text):
        ids = engine.tokenizer(free[a].text, add_special_tokens=False).input_ids
        for k in range(2, 6):
            piece = engine.tokenizer.decode(ids[k:k + 1]).strip()
            if len(piece) >= 2 and piece not in free[b].text and piece not in engine.tokenizer.decode(ids[:k]):
                found = a, b, piece
                break
        if found:
            break
    assert found, "no stop string that ends one row before the other"
    a, b, stop = found
    steps = [engine.prepare([{"role": "user", "content": PROMPTS[i]}], max_tokens=8, stop=[stop]) for i in (a, b)]
    alone = [engine.generate([step])[0] for step in steps]
    assert alone[0].completion_tokens < alone[1].completion_tokens == 8
    for answers in (engine.generate(steps, prefills=[prefill_step(engine, step) for step in steps]),
                    engine.generate(steps)):  # grouped, and a plain batch
        for answer, one in zip(answers, alone):
            assert (answer.text, answer.completion_tokens, answer.finish_reason) == (
                one.text, one.completion_tokens, one.finish_reason)
            assert answer.route["flops_total"] == one.route["flops_total"]
            assert answer.route["flops_skipped"] == one.route["flops_skipped"]
