"""Step-time model against measured H100/H200 steps (validation/records), held-out runs apart.

The held-out rule is fixed in validation/steptime_data.py (records' own holdout flags plus every H200
record). Tolerances: the issue's bars (median |error| <= 15%, >= 80% within 30%) are not reached yet
(held-out 17.2% / 77% at this commit) and are kept as a strict xfail, so the day they pass the test says
so; a regression guard holds today's level (median <= 20%, >= 70% within 30%).
"""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "validation"))

from score_steptime import scored, summary  # noqa: E402

from memfit.job import Job  # noqa: E402
from memfit.plan.steptime import step_time  # noqa: E402


@pytest.fixture(scope="module")
def held_out():
    rows = [r for r in scored() if r["held_out"]]
    assert len(rows) >= 20
    return summary(rows)


def test_held_out_no_worse_than_today(held_out):
    assert held_out["median"] <= 0.20
    assert held_out["within30"] >= 0.70


@pytest.mark.xfail(strict=True, reason="issue 11 bars not reached yet: held-out median 17.2%, 77% within 30%")
def test_held_out_meets_issue_bars(held_out):
    assert held_out["median"] <= 0.15 and held_out["within30"] >= 0.80


def test_monotone_and_fast():
    from memfit.models import load_model

    spec = load_model("llama-3.2-1b")
    j = Job(model="llama-3.2-1b", batch_size=2, seq_len=1024)
    a, b = step_time(j, spec, "h100-80gb"), step_time(j.replace(batch_size=4), spec, "h100-80gb")
    assert b.seconds > a.seconds  # more tokens, more time
    assert step_time(j.replace(gradient_checkpointing=True), spec, "h100-80gb").seconds > a.seconds
    assert step_time(j, spec, "rtx-4090").seconds > a.seconds  # slower card
    t0 = time.perf_counter()
    for _ in range(200):
        step_time(j, spec, "h100-80gb")
    assert (time.perf_counter() - t0) / 200 < 1e-3  # pure Python, well under a millisecond
