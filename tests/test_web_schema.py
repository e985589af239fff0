"""Schema fuzz: schemathesis generates requests from the app's own OpenAPI schema (>= 1000 in all) and
every answer must be below 500. Half of the generated jobs get a real registry model, so the requests reach
the estimator and the planner with schema-valid but arbitrary field values, not just the model lookup."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from memfit.web import create_app  # noqa: E402

MODELS = ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b"]
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def schema():
    return schemathesis.openapi.from_asgi("/openapi.json", create_app())


def _with_model(case, model, card):
    """Point a generated job at a real model and card (None: keep the generated ones)."""
    body = getattr(case, "body", None)
    if model is not None and isinstance(body, dict) and isinstance(body.get("job"), dict):
        body["job"]["model"] = model
        body.pop("config", None)
        if card is not None:
            body["gpu"] = card
            body.pop("gpu_memory", None)
    return case


def _fuzz(op, n: int) -> tuple[int, int, list[str]]:
    seen, ok, bad = 0, 0, []

    @given(case=st.builds(_with_model, op.as_strategy(), st.sampled_from([None, *MODELS]),
                         st.sampled_from([None, "rtx-4090", "h100-80gb"])))
    @settings(max_examples=n, **SETTINGS)
    def run(case):
        nonlocal seen, ok
        seen += 1
        r = case.call()
        ok += r.status_code < 300
        if r.status_code >= 500:
            bad.append(f"{r.status_code} {case.body!r}: {r.text[:200]}")

    run()
    return seen, ok, bad


def test_no_server_errors_over_1000_requests(schema):
    counts, answered, errors = {}, {}, []
    for path, method, n in (("/api/estimate", "POST", 800), ("/api/plan", "POST", 200),
                            ("/api/models", "GET", 5), ("/api/gpus", "GET", 5), ("/api/job-fields", "GET", 5)):
        seen, ok, bad = _fuzz(schema[path][method], n)
        counts[f"{method} {path}"], answered[f"{method} {path}"] = seen, ok
        errors += bad
    print(f"\nschema fuzz: {counts}, {sum(counts.values())} requests, 2xx {answered}, "
          f"{len(errors)} server errors")
    assert sum(counts.values()) >= 1000, counts
    assert errors == [], errors[:5]
