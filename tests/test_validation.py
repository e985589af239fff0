"""The accuracy bars, checked on the committed H100 records (no GPU needed): a change that breaks the
estimate's accuracy fails here."""

import re
from pathlib import Path

from memfit.validate import BARS, check_bars, load_records, score, summarize

RECORDS = Path(__file__).resolve().parents[1] / "validation" / "records"


def test_records_cover_the_issue():
    recs = load_records(RECORDS)
    assert len(recs) >= 25
    jobs = [r["job"] for r in recs]
    assert {j["precision"] for j in jobs} >= {"32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true"}
    assert {j["optimizer"] for j in jobs if j["task"] == "train"} >= {"adamw", "sgd", "adafactor"}
    assert any(j["method"] == "lora" and j["lora_targets"] == "all-linear" for j in jobs)
    assert any(j["method"] == "lora" and isinstance(j["lora_targets"], list) for j in jobs)
    assert {j["gradient_checkpointing"] for j in jobs} == {True, False}
    assert {j["attention"] for j in jobs} >= {"eager", "sdpa"}
    assert any(j["task"] == "infer" and j["new_tokens"] > 0 for j in jobs)
    assert any(j["task"] == "infer" and j["new_tokens"] == 0 for j in jobs)
    assert len({j["model"] for j in jobs}) >= 10
    for r in recs:
        env = r["env"]
        assert env.get("gpu") or env.get("gpu_name"), r["name"]
        # the versions that produced the record: torch and transformers as release numbers
        assert re.match(r"^\d+\.\d+", str(env.get("torch") or "")), (r["name"], env.get("torch"))
        assert re.match(r"^\d+\.\d+", str(env.get("transformers") or "")), (r["name"], env.get("transformers"))


def test_estimate_meets_the_accuracy_bars():
    rows = score(load_records(RECORDS), "estimate")
    summary = summarize(rows)
    assert summary["single"]["median"] <= BARS["estimate"]["single"][0]
    assert check_bars(summary, "estimate") == []


def test_trace_meets_its_accuracy_bars():
    """Issue 6: the trace engine on the single-GPU records, median |error| <= 2%, none worse than 6%
    (bitsandbytes jobs fall back to the estimate and are scored under the quant bars)."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # the H100 records of issues 2-6 (the trace of 16k-token generate() jobs takes minutes on 2 cores: the H200
    # records are traced by validation/score.py --engine trace, not in CI)
    # long generate() runs (over 64 new tokens: hundreds of decode steps on fake tensors) are traced by
    # validation/score.py --engine trace instead, to keep CI's time down
    rows = score([r for r in load_records(RECORDS) if Path(r["_file"]).name.startswith("h100-")
                  and not (r["job"].get("task") == "infer" and r["job"].get("new_tokens", 0) > 64)], "trace")
    summary = summarize(rows)
    assert summary["single"]["runs"] >= 25
    assert check_bars(summary, "trace") == []
