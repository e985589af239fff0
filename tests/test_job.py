import json

import pytest

from memfit.errors import JobError
from memfit.job import Job, load_job


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"seq_len": -1}, "seq_len must be a whole number >= 1"),
    ({"method": "lora", "lora_rank": 0}, "lora_rank must be a whole number >= 1"),
    ({"precision": "fp8-mixed"}, "precision must be one of 32-true, 16-mixed"),
    ({"optimizer": "adamax"}, "optimizer must be one of"),
    ({"gpus": 2, "gpus_per_node": 4}, "gpus_per_node (4) is more than gpus (2)"),
    ({"attention": "xformers"}, "attention must be one of sdpa, eager, flash"),
    ({"lora_targets": []}, "lora_targets must be 'all-linear' or a non-empty list"),
    ({"quantization": "nf4"}, "fine-tune it with method: lora"),
])
def test_impossible_jobs_are_one_line_errors(changes, message):
    with pytest.raises(JobError) as err:
        Job(model="gpt2", **changes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_field_lists_allowed():
    with pytest.raises(JobError, match=r"unknown job field\(s\) batchsize; allowed: .*batch_size"):
        Job.from_dict({"model": "gpt2", "batchsize": 4})


def test_qlora_shorthand_sets_nf4_double_quant():
    job = Job(model="llama-3.1-8b", method="qlora")
    assert (job.quantization, job.double_quant, job.is_lora) == ("nf4", True, True)


def test_comma_targets_and_roundtrip(tmp_path):
    job = Job(model="qwen3-4b", method="lora", lora_targets="q_proj, v_proj", batch_size=4)
    assert job.lora_targets == ["q_proj", "v_proj"]
    p = tmp_path / "job.json"
    p.write_text(json.dumps(job.to_dict()))
    assert load_job(p) == job
    y = tmp_path / "job.yaml"
    y.write_text("model: qwen3-4b\nmethod: lora\nlora_targets: [q_proj, v_proj]\nbatch_size: 4\n")
    assert load_job(y) == job


def test_malformed_job_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(JobError, match="cannot parse job file"):
        load_job(p)
