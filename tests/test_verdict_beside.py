"""Memo.verdict replays the second order of segment addresses on a worker thread beside the first where another
core is free (memfit.estimator._beside): the answers are those of the replays one after another."""

from __future__ import annotations

import pytest

from memfit import Job
from memfit.estimator import Memo, _beside, estimate, fits_on
from memfit.models import load_model

GiB = 2**30


def _answers(jobs, spec, cards):
    out = []
    for job in jobs:
        memo = Memo()
        for card in cards:
            b = estimate(job, spec, gpu_memory_bytes=card, memo=memo)
            out.append((job.batch_size, card, fits_on(job, card, spec, memo=memo), b.fits, b.peak_reserved_bytes,
                        b.device_total_bytes, b.headroom_bytes, tuple(b.notes), b.extras.get("decided_by")))
    return out


@pytest.mark.parametrize("model,kw", [("qwen2.5-0.5b", {}), ("llama-3.2-1b", {"method": "lora",
                                                                              "gradient_checkpointing": True})])
def test_threaded_verdicts_are_the_sequential_ones(model, kw, monkeypatch):
    spec = load_model(model)
    jobs = [Job(model=model, batch_size=b, seq_len=1024, **kw) for b in (1, 2, 4, 8, 16)]
    cards = [8 * GiB, 12 * GiB, 16 * GiB, 24 * GiB]  # fits, fails through fragmentation, fails outright
    monkeypatch.setattr(_beside, "_cores", False)
    sequential = _answers(jobs, spec, cards)
    monkeypatch.setattr(_beside, "_cores", True)
    assert _answers(jobs, spec, cards) == sequential
    assert any(not a[2] for a in sequential) and any(a[2] for a in sequential)


def test_a_worker_error_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(_beside, "_cores", True)

    def boom():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        _beside.run(boom)()
    assert _beside.run(lambda: 7)() == 7
