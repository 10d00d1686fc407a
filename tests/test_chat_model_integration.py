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

LONG_UNICODE_ARGUMENTS = ("the grammar holds the call to the tool's schema, but the 135M model's unicode string "
                          "argument runs on until max_tokens cuts the call before </tool_call>")
JSON_MODE_KEYS = ("json_mode holds the answer to JSON, not to the schema's keys (json_schema does), and the 135M "
                  "model leaves out the 'punchline' key the prompt asks for")

XFAILS = {
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


def _inherited(name: str):
    """The suite's test ``name`` as a function of its own, so marks can be set on it without touching the base
    class's (``functools.wraps`` carries its parametrisation over)."""
    inherited = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(inherited):

        @functools.wraps(inherited)
        async def test(self, *args, **kwargs):
            return await inherited(self, *args, **kwargs)
    else:

        @functools.wraps(inherited)
        def test(self, *args, **kwargs):
            return inherited(self, *args, **kwargs)

    return test


for _name, _reason in XFAILS.items():
    setattr(TestChatLayerRouteIntegration, _name, pytest.mark.xfail(reason=_reason, strict=True)(_inherited(_name)))
