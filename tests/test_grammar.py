"""The decoding grammars (xgrammar under the hood) on the embedded tokenizer: what a tool call, a tool choice and a
JSON schema let through, token by token."""

from __future__ import annotations

import logging

import pytest
import torch
import xgrammar as xgr
from transformers import LogitsProcessorList

from layerroute import LayerRouteModel, load_base_model
from layerroute.grammar import DecodingGrammars

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"]}}}
LEGACY = {"type": "function", "function": {"name": "legacy", "parameters": {
    "type": "object", "properties": {"x": {"type": "float"}}}}}  # "float" is not a JSON-schema type
OSLO = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.fixture(scope="module")
def grammars(smollm2):
    _, tokenizer = smollm2
    return DecodingGrammars(tokenizer, len(tokenizer)), tokenizer


def accepts(grammars, grammar, text: str, complete: bool = True) -> bool:
    """Whether ``text`` is a prefix the grammar allows (``complete``: and the answer may end there)."""
    tokenizer = grammars[1]
    matcher = xgr.GrammarMatcher(grammar)
    if not all(matcher.accept_token(t) for t in tokenizer(text, add_special_tokens=False).input_ids):
        return False
    return not complete or matcher.accept_token(tokenizer.eos_token_id)


@pytest.mark.parametrize(("text", "allowed"), [
    (OSLO, True),
    ("Sure, let me check.\n" + OSLO, True),  # prose before a call
    (OSLO + "\n" + OSLO.replace("Oslo", "Rome"), True),  # parallel calls
    ("The weather is fine.", True),  # no call at all (auto)
    (OSLO.replace('"city": "Oslo"', '"city": "Oslo", "unit": "k"'), False),  # not in the enum
    (OSLO.replace('"city": "Oslo"', '"city": 7'), False),  # wrong type
    (OSLO.replace('{"city": "Oslo"}', "{}"), False),  # required key missing
    (OSLO.replace('"city": "Oslo"', '"city": "Oslo", "country": "NO"'), False),  # a key the schema lacks
    (OSLO.replace("get_weather", "get_wether"), False),  # not a bound tool
    (OSLO.replace("</tool_call>", ""), False),  # a call must be closed before the answer ends
])
def test_tool_calls_must_follow_the_bound_schemas(grammars, text, allowed):
    assert accepts(grammars, grammars[0].tool_calls([WEATHER], None), text) is allowed


def test_tool_choice_is_enforced(grammars):
    tools = [WEATHER, LEGACY]
    required, named, none = (grammars[0].tool_calls(tools, choice)
                             for choice in (("required",), ("name", "legacy"), ("none",)))
    assert not accepts(grammars, required, "The weather is fine.") and accepts(grammars, required, OSLO)
    assert not accepts(grammars, named, OSLO)
    assert accepts(grammars, named, '<tool_call>\n{"name": "legacy", "arguments": {"x": 1.5}}\n</tool_call>')
    assert accepts(grammars, none, "The weather is fine.")
    assert not accepts(grammars, none, "Let me call <tool_call>", complete=False)


def test_a_schema_the_engine_rejects_leaves_that_tools_arguments_free(grammars, caplog):
    with caplog.at_level(logging.WARNING, logger="layerroute.grammar"):
        grammar = grammars[0].tool_calls([WEATHER, LEGACY], None)
    assert "tool 'legacy'" in caplog.text and 'Unsupported type "float"' in caplog.text
    assert accepts(grammars, grammar, '<tool_call>\n{"name": "legacy", "arguments": {"y": [1]}}\n</tool_call>')
    assert not accepts(grammars, grammar, '<tool_call>\n{"name": "legacy", "arguments": 3}\n</tool_call>')
    assert not accepts(grammars, grammar, OSLO.replace('"Oslo"', "7"))  # the other tool stays constrained


def test_json_schema_and_json_object(grammars):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = grammars[0].json_schema(schema)
    assert accepts(grammars, grammar, '{"n": 3}') and not accepts(grammars, grammar, '{"n": "3"}')
    assert not accepts(grammars, grammar, 'Here: {"n": 3}')
    assert grammars[0].json_schema(dict(schema)) is grammar  # compiled once
    assert accepts(grammars, grammars[0].json_object(), '{"any": ["thing", 1]}')
    with pytest.raises(ValueError, match='cannot compile this JSON schema: Unsupported type "float"'):
        grammars[0].json_schema(LEGACY["function"]["parameters"])


def test_properties_keep_the_schemas_order(grammars):
    """The grammar holds properties in the order the schema lists them, as models learnt them, never sorted."""
    joke = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
            "required": ["setup", "punchline"]}
    grammar = grammars[0].json_schema(joke)
    assert accepts(grammars, grammar, '{"setup": "a", "punchline": "b"}')
    assert not accepts(grammars, grammar, '{"punchline": "b", "setup": "a"}', complete=False)
    tool = {"type": "function", "function": {"name": "book", "parameters": joke}}
    calls = grammars[0].tool_calls([tool], None)
    call = '<tool_call>\n{"name": "book", "arguments": {"setup": "a", "punchline": "b"}}\n</tool_call>'
    assert accepts(grammars, calls, call)
    assert not accepts(grammars, calls, call.replace('"setup": "a", "punchline": "b"', '"punchline": "b", "setup": "a"'))


def test_without_parallel_calls_the_answer_ends_after_its_first_call(grammars):
    single, required = (grammars[0].tool_calls([WEATHER], choice, parallel_tool_calls=False)
                        for choice in (None, ("required",)))
    for grammar in (single, required):
        assert accepts(grammars, grammar, OSLO)
        assert not accepts(grammars, grammar, OSLO + "\n" + OSLO.replace("Oslo", "Rome"), complete=False)
    assert accepts(grammars, single, "The weather is fine.")  # auto may still answer in prose
    assert grammars[0].tool_calls([WEATHER], None) is not single  # cached apart from the parallel grammar


def test_allowed_tokens_are_what_the_grammar_lets_through(grammars):
    decoding, tokenizer = grammars
    processor = decoding.processor(decoding.tool_calls([WEATHER], ("name", "get_weather")))
    prompt = torch.tensor([tokenizer("Weather in Oslo?").input_ids])
    processor.advance(prompt)
    allowed = processor.allowed_tokens(len(tokenizer))
    assert 0 < len(allowed) < 10  # a named tool choice forces the call's opening
    assert all(OSLO.startswith(tokenizer.decode([t])) for t in allowed.tolist())
    assert processor.allowed_tokens(len(allowed) - 1) is None  # more than the caller would restrict to
    free_row = decoding.processor([decoding.tool_calls([WEATHER], None), None])
    free_row.advance(prompt.repeat(2, 1))
    assert free_row.allowed_tokens(len(tokenizer)) is None  # a free row needs every logit


def test_a_grammar_restricts_the_lm_head_and_generates_the_same_tokens(grammars, tiny_chat_dir):
    decoding, tokenizer = grammars
    model = LayerRouteModel.from_base(load_base_model(tiny_chat_dir)[0]).eval()
    grammar = decoding.tool_calls([WEATHER], ("name", "get_weather"))
    prompt = torch.tensor([tokenizer("Weather in Oslo?").input_ids])
    generated, routes = {}, {}
    for restrict in (True, False):
        out = model.generate(prompt, forced_skip=(), do_sample=False, max_new_tokens=24, restrict_lm_head=restrict,
                             logits_processor=LogitsProcessorList([decoding.processor(grammar)]))
        generated[restrict], routes[restrict] = out[0, prompt.shape[1]:].tolist(), model.last_route
    assert generated[True] == generated[False]
    assert tokenizer.decode(generated[True]).startswith('<tool_call>\n{"name": "get_weather", "')
    # the forced tokens computed a few logits each instead of the vocabulary's: the FLOP count says so
    assert routes[True].flops_total < routes[False].flops_total
    processors = LogitsProcessorList([decoding.processor(grammar)])
    out = model.generate(prompt, forced_skip=(), do_sample=False, max_new_tokens=4, output_logits=True,
                         return_dict_in_generate=True, logits_processor=processors)
    assert all(bool(logits.isfinite().all()) for logits in out.logits)  # raw logits asked for: the full head
