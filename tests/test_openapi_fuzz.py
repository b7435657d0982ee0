"""Issue #15: schemathesis sends request bodies generated from the served OpenAPI
document to every operation; no reply may be a 5xx or differ from the document
(status, media type, JSON schema, headers). Bounded: a few dozen examples per
operation, no shrinking, answers of at most 8 tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import ServerProcess, running_server

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        tiny_checkpoint, tmp_path_factory.mktemp("logs"),
        "--served-model-name", "qwen-audio-chat", "--max-tokens-limit", "8",
        "--max-body-bytes", str(2 * 1024 * 1024),
    ) as server:
        yield server


def test_generated_requests_get_no_5xx_and_replies_match_the_document(
    fuzzed_server: ServerProcess,
) -> None:
    document = httpx.get(fuzzed_server.base_url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    exercised: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            reply = case.call(base_url=fuzzed_server.base_url, timeout=60)
            case.validate_response(reply, checks=CHECKS)

        exercise()
        exercised.append(operation.label)
    assert "POST /v1/chat/completions" in exercised
    assert "POST /v1/audio/transcriptions" in exercised
    assert "Traceback" not in fuzzed_server.log()
