"""Schemathesis fuzzes every operation of the app's /openapi.json, valid and invalid inputs,
for a bounded number of examples: no response may be a 5xx, every 4xx is OpenAI-shaped, and
the server answers correctly afterwards. (Against the ``small`` app: a 128-token context keeps
each accepted generation short.)"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

EXAMPLES = 100  # per operation and mode: ~400 calls, about 20 s on 2 busy cores


def test_openapi_fuzz_has_no_server_errors(small_app):
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{small_app.url}/openapi.json")
    problems: list[str] = []
    statuses: Counter[int] = Counter()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                r = case.call(base_url=small_app.url, timeout=60)
                statuses[r.status_code] += 1
                if r.status_code >= 500:
                    problems.append(f"{case.method} {case.path} {case.body!r:.200} -> "
                                    f"{r.status_code} {r.text[:200]}")
                elif r.status_code >= 400:
                    try:
                        err = r.json()["error"]
                        assert isinstance(err["message"], str) and err["message"]
                    except (ValueError, KeyError, TypeError, AssertionError):
                        problems.append(f"{case.method} {case.path}: not an OpenAI error: "
                                        f"{r.status_code} {r.text[:200]}")

            try:
                run()
            except Unsatisfiable:
                # no invalid input exists for an operation without parameters (GET /health)
                assert mode == GenerationMode.NEGATIVE and not op.body and not op.query, op
    elapsed = time.monotonic() - t0
    assert not problems, "\n".join(problems[:20])
    # both accepted requests (generation ran) and refused ones were exercised
    assert statuses[200] >= 20 and sum(statuses.values()) - statuses[200] >= 50, statuses
    print(f"fuzz: {sum(statuses.values())} calls in {elapsed:.1f} s, statuses {dict(statuses)}")
    assert elapsed < 60, f"fuzzing took {elapsed:.0f} s"
    with httpx.Client(base_url=small_app.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
