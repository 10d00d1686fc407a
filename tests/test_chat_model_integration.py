"""langchain-tests' standard integration suite against the real embedded model: SmolLM2-135M-Instruct with the
shipped adapter, routing on.

The suite was written for hosted frontier models. The few tests a 135M-parameter model cannot pass are xfailed one by
one, strictly (greedy decoding makes the outcome deterministic, so a pass means the reason has gone and the mark
must go too), each with the reason; tests of input kinds this local text model does not take (images, audio, PDFs,
Anthropic blocks) are skipped by the suite itself through the ``supports_*`` flags.
"""

from __future__ import annotations

import functools
import inspect

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from test_chat_model import ChatLayerRouteCapabilities

pytestmark = pytest.mark.slow

SMALL_TALK = ("the shipped adapter was trained on agent steps only: to a bare 'Hello' in a multi-message "
              "conversation the 135M model answers with end-of-turn first, an empty message")
LONG_UNICODE_ARGUMENTS = ("the grammar holds the call to the tool's schema, but the 135M model's unicode string "
                          "argument runs on until max_tokens cuts the call before </tool_call>")
JSON_MODE_KEYS = ("json_mode holds the answer to JSON, not to the schema's keys (json_schema does), and the 135M "
                  "model leaves out the 'punchline' key the prompt asks for")

XFAILS = {
    "test_conversation": SMALL_TALK,
    "test_double_messages_conversation": SMALL_TALK,
    "test_unicode_tool_call_integration": LONG_UNICODE_ARGUMENTS,
    "test_json_mode": JSON_MODE_KEYS,
}


class TestChatLayerRouteIntegration(ChatLayerRouteCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 48}

    @property
    def supports_json_mode(self) -> bool:
        return True


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

    return pytest.mark.xfail(reason=reason, strict=True)(test)


for _name, _reason in XFAILS.items():
    setattr(TestChatLayerRouteIntegration, _name, _expected_failure(_name, _reason))
