"""langchain-tests' standard integration suite against the real embedded model: SmolLM2-135M-Instruct with the
shipped adapter, routing on.

The suite was written for hosted frontier models. Tests a 135M-parameter model cannot pass are xfailed one by one,
each with the reason (non-strict: an xpass is welcome, not an error); tests of input kinds this local text model does
not take (images, audio, PDFs, Anthropic blocks) are skipped by the suite itself through the ``supports_*`` flags.
"""

from __future__ import annotations

import functools
import inspect

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from test_chat_model import ChatLayerRouteCapabilities

pytestmark = pytest.mark.slow

SMALL_MODEL_TOOL_CALLS = ("SmolLM2-135M rarely emits a well-formed call of the requested tool when the prompt leaves "
                          "it free")
SMALL_MODEL_STRUCTURED = ("SmolLM2-135M cannot reliably fill a JSON schema (structured output is a forced tool call "
                          "whose arguments it must invent)")

SMALL_MODEL_SMALL_TALK = ("the shipped adapter was trained on agent steps only; to a bare 'Hello' the 135M model often "
                          "answers with end-of-turn first, an empty message")
SMALL_MODEL_FORCED_CALL = ("forced to call a tool in reply to 'Hello!', SmolLM2-135M does not close the <tool_call> "
                           "block within max_tokens, so the call is returned in invalid_tool_calls")
SMALL_MODEL_AGENT_CALLS = ("the shipped adapter names the tool right (tool names are constrained) but garbles the "
                           "arguments: it invents keys (city, city_map beside location) until max_tokens cuts the "
                           "call, or writes '\"arguments\": 1', so the call lands in invalid_tool_calls")

XFAILS = {
    "test_bind_runnables_as_tools": SMALL_MODEL_AGENT_CALLS,
    "test_agent_loop": SMALL_MODEL_AGENT_CALLS,
    "test_batch": SMALL_MODEL_SMALL_TALK,
    "test_abatch": SMALL_MODEL_SMALL_TALK,
    "test_conversation": SMALL_MODEL_SMALL_TALK,
    "test_double_messages_conversation": SMALL_MODEL_SMALL_TALK,
    "test_message_with_name": SMALL_MODEL_SMALL_TALK,
    "test_tool_choice": SMALL_MODEL_FORCED_CALL,
    "test_tool_calling": SMALL_MODEL_TOOL_CALLS,
    "test_tool_calling_async": SMALL_MODEL_TOOL_CALLS,
    "test_tool_calling_with_no_arguments": SMALL_MODEL_TOOL_CALLS,
    "test_unicode_tool_call_integration": SMALL_MODEL_TOOL_CALLS,
    "test_structured_output": SMALL_MODEL_STRUCTURED,
    "test_structured_output_async": SMALL_MODEL_STRUCTURED,
    "test_structured_output_pydantic_2_v1": SMALL_MODEL_STRUCTURED,
    "test_structured_output_optional_param": SMALL_MODEL_STRUCTURED,
}


class TestChatLayerRouteIntegration(ChatLayerRouteCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 48}

    @property
    def supports_json_mode(self) -> bool:
        return False


def _expected_failure(name: str, reason: str):
    """The suite's test ``name``, marked xfail; its parametrisation and fixtures carry over (the base class's own
    function is left untouched)."""
    inherited = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(inherited):

        @functools.wraps(inherited)
        async def test(self, *args, **kwargs):
            return await inherited(self, *args, **kwargs)
    else:

        @functools.wraps(inherited)
        def test(self, *args, **kwargs):
            return inherited(self, *args, **kwargs)

    return pytest.mark.xfail(reason=reason, strict=False)(test)


for _name, _reason in XFAILS.items():
    setattr(TestChatLayerRouteIntegration, _name, _expected_failure(_name, _reason))
