"""What a new user hit (issue 10), one test each; and the issue's own examples of bad input.

Exact where the answer is a message or a field; byte figures are checked against independent arithmetic
(bytes per parameter) with the tolerance stated at each.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from memfit import Job, estimate, load_model
from memfit.cli import main
from memfit.errors import ConfigError, JobError, MemfitError, MissingDependencyError, ModelNotFoundError
from memfit.job import load_job
from memfit.models import _REGISTRY_DIR, _read_json, spec_from_config  # noqa: PLC2701

GiB = 1 << 30


# ------------------------------------------------------------------- the examples of bad input
def _deep(n):
    d = 1
    for _ in range(n):
        d = [d]
    return d


@pytest.mark.parametrize("data", [
    {"model": "gpt2", 1: 1},
    {"model": "gpt2", "method": "lora", "lora_targets": None},
    {"model": "gpt2", "method": "lora", "lora_targets": 3},
    {"model": "gpt2", "method": "lora", "lora_rank": [8]},
    {"model": "gpt2", "batch_size": 10**300},
    {"model": "gpt2", "batch_size": 1e300},
    {"model": "gpt2", "seq_len": 10**5000 - 1},
])
def test_bad_job_dicts_are_job_errors(data):
    with pytest.raises(JobError):
        estimate(Job.from_dict(data))


@pytest.mark.parametrize("ref, error", [
    ("m" * 300, ModelNotFoundError),
    ("~nosuchuser/config.json", ModelNotFoundError),
    (7, ModelNotFoundError),
])
def test_bad_model_refs(ref, error):
    with pytest.raises(error):
        load_model(ref)


def test_load_model_takes_a_path():
    assert load_model(pathlib.Path(_REGISTRY_DIR / "gpt2.json")).parameters == load_model("gpt2").parameters


@pytest.mark.parametrize("change", [
    {"hidden_size": 10**5000 - 1}, {"num_hidden_layers": 2**31}, {"num_hidden_layers": _deep(100_000)},
    {"hidden_size": 10**12}, {"model_type": ["llama"]},
])
def test_bad_configs_are_config_errors(change):
    raw = _read_json(_REGISTRY_DIR / "llama-3.2-1b.json")
    with pytest.raises(ConfigError):
        spec_from_config({**raw, **change}, name="x")


def test_config_file_too_deep_or_too_long_a_number(tmp_path):
    for text in ("[" * 100_000, '{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}"):
        p = tmp_path / "config.json"
        p.write_text(text)
        with pytest.raises(ConfigError):
            load_model(str(p))


def test_binary_and_set_job_files(tmp_path):
    b = tmp_path / "job.yaml"
    b.write_bytes(bytes(range(256)))
    with pytest.raises(JobError, match="not UTF-8"):
        load_job(b)
    s = tmp_path / "set.yaml"
    s.write_text("model: gpt2\nlora_targets: !!set {q_proj, v_proj}\nmethod: lora\n")
    with pytest.raises(JobError, match="lora_targets"):
        load_job(s)


@pytest.mark.parametrize("cfg", [
    {"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam", "params": [1, 2]}},
    {"zero_optimization": {"stage": 3, "offload_optimizer": 3}},
    {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1e400},
])
def test_bad_deepspeed_configs(cfg):
    from memfit.deepspeed_config import read_deepspeed_config

    with pytest.raises(JobError):
        read_deepspeed_config(cfg)


def test_accelerate_fsdp_config_list():
    from memfit.deepspeed_config import read_accelerate_config

    with pytest.raises(JobError, match="fsdp_config must be a mapping"):
        read_accelerate_config({"distributed_type": "FSDP", "fsdp_config": [1]})


# ------------------------------------------------------------------- measure without a GPU
def test_measure_refuses_without_a_gpu_unless_asked_for_the_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from memfit.measurer import measure

    with pytest.raises(MemfitError, match="--cpu"):
        measure(Job(model="llama-3.2-1b"), progress=False)


def test_cpu_run_checks_host_memory():
    from memfit.measurer.engine import check_host_memory

    job = Job(model="llama-3.1-8b")
    with pytest.raises(MemfitError, match="GiB available"):
        check_host_memory(job, load_model("llama-3.1-8b"), available=16 * GiB)
    check_host_memory(job, load_model("llama-3.1-8b"), available=1 << 50)  # room: no error


# ------------------------------------------------------------------- QLoRA double quantization
def test_qlora_keeps_an_explicit_no_double_quant(tmp_path):
    assert Job(model="llama-3.2-1b", method="qlora").double_quant is True
    assert Job(model="llama-3.2-1b", method="qlora", double_quant=False).double_quant is False
    p = tmp_path / "job.yaml"
    p.write_text("model: llama-3.2-1b\nmethod: qlora\ndouble_quant: false\n")
    assert load_job(p).double_quant is False
    on = estimate(Job(model="llama-3.2-1b", method="qlora"))
    off = estimate(Job(model="llama-3.2-1b", method="qlora", double_quant=False))
    assert off.components["quantization_state"] > on.components["quantization_state"]


def test_cli_no_double_quant(capsys):
    assert main(["estimate", "llama-3.2-1b", "--method", "qlora", "--no-double-quant", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["double_quant"] is False


# ------------------------------------------------------------------- inference dtype
def test_inference_defaults_to_the_checkpoint_dtype():
    job = Job(model="llama-3.1-8b", task="infer", new_tokens=16)
    assert job.precision == "bf16-true"  # config.json: "torch_dtype": "bfloat16"
    spec = load_model("llama-3.1-8b")
    # 2 bytes per weight, to within 1% (nothing else in "weights")
    assert estimate(job).components["weights"] == pytest.approx(2 * spec.parameters, rel=0.01)
    assert Job(model="gpt2", task="infer").precision == "32-true"  # no torch_dtype: transformers loads fp32
    assert Job(model="llama-3.1-8b").precision == "bf16-mixed"  # training keeps the mixed default
    assert Job(model="llama-3.1-8b", task="infer", precision="bf16-mixed").precision == "bf16-mixed"


def test_inference_notes_are_written_for_inference():
    from memfit.render import breakdown_table

    bd = estimate(Job(model="llama-3.2-1b", task="infer", precision="bf16-mixed", new_tokens=8))
    from rich.console import Console

    c = Console(record=True, width=200)
    c.print(breakdown_table(bd))
    text = c.export_text()
    assert "held until backward" not in text and "one linear at a time" in text


# ------------------------------------------------------------------- flags that do not apply, odd jobs
def test_flags_that_do_not_apply_warn(capsys):
    assert main(["estimate", "gpt2", "--task", "infer", "--seq-len", "512"]) == 0
    assert "--seq-len applies to training only" in capsys.readouterr().err
    assert main(["estimate", "gpt2", "--new-tokens", "8", "--seq-len", "512"]) == 0
    assert "--new-tokens applies to inference only" in capsys.readouterr().err


def test_warnings_never_add_a_line_to_an_error(capsys):
    assert main(["estimate", "no-such-model-x", "--task", "infer", "--seq-len", "5"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_seq_len_beyond_rotary_positions_is_noted():
    """A rotary model may extrapolate: past max_position_embeddings the estimate answers, with a note."""
    bd = estimate(Job(model="llama-3.2-1b", seq_len=200_000))
    assert any("max_position_embeddings" in n for n in bd.notes)


@pytest.mark.parametrize("model, limit, key", [
    ("gpt2", 1024, "n_positions"), ("gpt2-xl", 1024, "n_positions"), ("opt-125m", 2048, "max_position_embeddings"),
    ("bert-base-uncased", 512, "max_position_embeddings"), ("distilbert-sst2", 512, "max_position_embeddings"),
    ("validation/configs/roberta-base-cls", 512, "max_position_embeddings"),  # 514 rows, positions from 2
])
def test_seq_len_beyond_a_learned_position_table_is_an_error(model, limit, key):
    assert estimate(Job(model=model, seq_len=limit)).peak_allocated_bytes > 0  # the last position fits
    with pytest.raises(JobError, match=rf"seq_len {limit + 1} is longer than .*learned position table "
                                       rf"\({limit} positions, {key} \d+\).*--seq-len {limit} or less"):
        estimate(Job(model=model, seq_len=limit + 1))
    with pytest.raises(JobError, match=rf"prompt_len \+ new_tokens {limit + 1} is longer"):
        estimate(Job(model=model, task="infer", prompt_len=limit, new_tokens=1) if model.startswith(("gpt2", "opt"))
                 else Job(model=model, task="infer", prompt_len=limit + 1))


def test_seq_len_beyond_a_learned_table_is_one_line_on_the_cli(capsys):
    assert main(["estimate", "gpt2", "--seq-len", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1024 positions" in err and "--seq-len 1024 or less" in err
    assert "Traceback" not in err


def test_seq_len_beyond_a_learned_table_is_refused_by_trace_and_plan_too():
    from memfit.plan import max_seq_len
    from memfit.tracer import trace

    with pytest.raises(JobError, match="learned position table"):
        trace(Job(model="gpt2", seq_len=1025), fallback=True)
    assert max_seq_len(Job(model="gpt2"), 80 * 2**30) == 1024  # the search stops at the table


@pytest.mark.parametrize("model, seq, prompt", [
    ("gpt2", 1024, 512), ("bert-base-uncased", 512, 512), ("validation/configs/roberta-base-cls", 512, 512),
    ("opt-125m", 2048, 512), ("llama-3.2-1b", 2048, 512), ("qwen2.5-0.5b", 2048, 512),
])
def test_default_lengths_are_what_the_model_takes(model, seq, prompt):
    job = Job(model=model)
    assert (job.seq_len, job.prompt_len) == (seq, prompt)
    estimate(job)  # no error: the default is a run that exists
    assert estimate(Job(model=model, task="infer", new_tokens=8)).peak_allocated_bytes > 0


def test_default_prompt_leaves_room_for_the_new_tokens():
    assert Job(model="gpt2", task="infer", new_tokens=600).prompt_len == 424
    assert Job(model="gpt2", task="infer", new_tokens=600, prompt_len=100).prompt_len == 100  # given: kept
    assert Job.from_dict({"model": "gpt2", "seq_len": None}).seq_len == 1024  # null in a job file: the default
    assert Job(model="no-such-model-x").seq_len == 2048  # unknown here: the engines report the model
    with pytest.raises(JobError, match="longer than gpt2's learned position table"):
        estimate(Job(model="gpt2", task="infer", new_tokens=2000))  # no prompt fits: the error says so


def test_lora_targets_matching_nothing_is_an_error():
    with pytest.raises(JobError, match="match no module"):
        estimate(Job(model="llama-3.2-1b", method="lora", lora_targets=["c_attn"]))


def test_flash_attention_in_fp32_is_an_error():
    with pytest.raises(JobError, match="fp16 or bf16"):
        Job(model="llama-3.2-1b", attention="flash", precision="32-true")


def test_header_names_gpus_strategy_and_quantization():
    from memfit.render import header_line

    line = header_line(Job(model="llama-3.2-1b", gpus=8, strategy="zero3", tensor_parallel=2).to_dict())
    assert "8 GPUs" in line and "zero3" in line and "TP 2" in line
    assert "nf4" in header_line(Job(model="llama-3.2-1b", method="qlora").to_dict())
    assert "1 GPU" in header_line(Job(model="llama-3.2-1b").to_dict())


def test_deepspeed_config_without_gpus_warns(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert main(["estimate", "llama-3.2-1b", "--deepspeed", str(ds)]) == 0
    assert "estimating 1 GPU; pass --gpus N" in capsys.readouterr().err
    assert main(["estimate", "llama-3.2-1b", "--deepspeed", str(ds), "--gpus", "8"]) == 0
    assert "pass --gpus" not in capsys.readouterr().err


def test_tiny_models_show_mib(capsys):
    from memfit.render import table_unit

    assert table_unit(estimate(Job(model="opt-125m", task="infer", prompt_len=16))) == "MiB"
    assert table_unit(estimate(Job(model="llama-3.2-1b"))) == "GiB"


# ------------------------------------------------------------------- sweep records and compare
def test_compare_picks_a_sweep_record_by_its_label(tmp_path):
    from memfit.commands.compare import _load_record

    bd = estimate(Job(model="gpt2", seq_len=128)).to_dict()
    recs = [{"label": lab, "name": lab, "job": Job(model="gpt2", seq_len=128).to_dict(), "breakdown": bd}
            for lab in ("32-true", "tf32", "bf16-mixed")]
    recs[1]["job"]["precision"] = "32-true"
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(recs))
    assert _load_record(str(p), "tf32")["label"] == "tf32"
    Job.from_dict(_load_record(str(p), "tf32")["job"])  # estimate can read the tf32 record's job
    old = [{k: v for k, v in r.items() if k != "name"} for r in recs]  # records written before names
    p.write_text(json.dumps(old))
    assert _load_record(str(p), "bf16-mixed")["label"] == "bf16-mixed"


# ------------------------------------------------------------------- Hub messages
def test_hub_offline_is_said(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(ModelNotFoundError, match="not reachable"):
        load_model("someone-nonexistent/not-a-model-xyz")


def test_hub_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingDependencyError, match=r"memfit\[hub\]"):
        load_model("someone-nonexistent/not-a-model-abc")


# ------------------------------------------------------------------- NVMe offload
def test_nvme_offload_is_estimated(capsys):
    base = dict(model="llama-3.1-8b", gpus=8, strategy="zero3", offload="optimizer+params")
    nvme = estimate(Job(**base, offload_device="nvme"))
    none = estimate(Job(model="llama-3.1-8b", gpus=8, strategy="zero3"))
    P = load_model("llama-3.1-8b").parameters
    # swap files per node: fp32 master + Adam's two moments + fp32 grads (16 B) and 16-bit params (2 B) per
    # parameter, the 8 ranks' partitions together: 18 bytes per parameter, exact to int() rounding
    assert abs(nvme.nvme_bytes - 18 * P) <= 8
    assert nvme.peak_allocated_bytes < none.peak_allocated_bytes
    assert main(["estimate", "llama-3.1-8b", "--gpus", "8", "--strategy", "zero3", "--offload", "optimizer+params",
                 "--offload-device", "nvme"]) == 0
    assert "NVMe" in capsys.readouterr().out


# ------------------------------------------------------------------- trace versions
def test_trace_refuses_untested_versions(monkeypatch):
    from memfit.tracer.engine import TESTED_VERSIONS, TraceVersionError, check_versions

    check_versions(dict(TESTED_VERSIONS))
    with pytest.raises(TraceVersionError, match=r"transformers==5\.17\.0, found 4\.57\.0"):
        check_versions({"transformers": "4.57.0"})
    check_versions({"transformers": "4.57.0"}, allow=True)
    transformers = pytest.importorskip("transformers")
    from memfit import trace

    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.raises(TraceVersionError):
        trace(Job(model="gpt2", seq_len=16))


def test_pyproject_pins_the_trace_versions():
    from memfit.tracer.engine import TESTED_VERSIONS

    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for extra in ("trace = [", "test = ["):
        line = next(ln for ln in text.splitlines() if ln.startswith(extra))
        for name, version in TESTED_VERSIONS.items():
            assert f'"{name}=={version}"' in line, (extra, name)


def test_compare_attributes_logits_alike_in_all_engines(tmp_path, capsys):
    """A measured record has no logits_and_loss (measure counts them in activations): compare folds the
    estimate's logits into its activations too, so the activations row compares like with like and the total
    is unchanged."""
    from memfit.commands.compare import attribute_alike

    job = Job(model="gpt2", seq_len=1024, batch_size=8)  # logits and activations at the peak
    est = estimate(job)
    measured = estimate(job)
    assert {"activations", "logits_and_loss"} <= set(est.components)
    measured.components["activations"] += measured.components.pop("logits_and_loss")
    engines = {"estimate": est, "measured": measured}
    notes = attribute_alike(engines)
    assert "logits_and_loss" not in est.components and notes
    assert est.components["activations"] == measured.components["activations"]
    assert sum(est.components.values()) == est.peak_allocated_bytes
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"job": job.to_dict(), "breakdown": measured.to_dict()}))
    assert main(["compare", "--measured", str(rec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "logits_and_loss" not in out["rows"] and out["notes"]


def test_the_card_questions_refuse_what_the_estimate_refuses():
    """max_batch_size and fits_on say the same as estimate() for a sequence past a learned position table: an
    error, not a batch count for a run that cannot start."""
    from memfit.estimator import fits_on, max_batch_size

    for job in (Job(model="bert-base-uncased", task="infer", prompt_len=512, new_tokens=32),
                Job(model="gpt2", seq_len=4096)):
        with pytest.raises(JobError, match="learned position table"):
            max_batch_size(job, 8 << 30)
        with pytest.raises(JobError, match="learned position table"):
            fits_on(job, 8 << 30)
