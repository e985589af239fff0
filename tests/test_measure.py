"""measure on the CPU (tensor-level accounting): exact component bytes, phases, records, OOM answers, the
batch script and the command. The CUDA path needs a GPU and is not exercised here.

Tolerances: none. On the CPU every number is a count of live tensor bytes, so weights and optimizer
states are checked to the byte.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memfit import reference as R  # noqa: E402
from memfit.breakdown import Breakdown  # noqa: E402
from memfit.job import Job  # noqa: E402
from memfit.measurer import measure, measure_sweep, read_record  # noqa: E402
from memfit.measurer import engine as E  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
         "max_position_embeddings": 256}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_positions": 128, "vocab_size": 256}


def spec(config=LLAMA):
    return R.spec_from_config(dict(config), name="tiny")


def job(**kw):
    base = {"model": "tiny", "seq_len": 32, "batch_size": 2}
    base.update(kw)
    return Job(**base)


def run(j, config=LLAMA, **kw):
    kw.setdefault("progress", False)
    return measure(j, spec=spec(config), device="cpu", **kw)


def reference_bytes(j, config=LLAMA):
    """Parameter and buffer bytes of the same model built outside measure (distinct storages)."""
    m = R.build_model(j, spec(config), "cpu")
    seen, params, buffers, trainable, lora = set(), 0, 0, 0, 0
    for name, p in m.named_parameters():
        n = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += n
        if "lora_" in name:
            lora += n
        elif p.untyped_storage().data_ptr() not in seen:
            params += n
        seen.add(p.untyped_storage().data_ptr())
    for b in m.buffers():
        if b.untyped_storage().data_ptr() not in seen:
            buffers += b.untyped_storage().nbytes()
            seen.add(b.untyped_storage().data_ptr())
    return {"weights": params + buffers, "trainable": trainable, "lora": lora}


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_full_training_components_are_exact(config, precision):
    j = job(precision=precision)
    bd = run(j, config)
    ref = reference_bytes(j, config)
    c = bd.components
    assert bd.engine == "measure" and bd.measurement == "cpu-tensors"
    assert c["weights"] == ref["weights"]
    assert c["optimizer_states"] == 2 * ref["trainable"]  # AdamW: exp_avg and exp_avg_sq, dtype of the params
    assert sum(c.values()) == bd.peak_allocated_bytes
    assert bd.peak_allocated_bytes >= c["weights"] + c["optimizer_states"]
    assert bd.peak_phase in ("forward", "backward", "optimizer_step")
    assert set(bd.phases) == {"load", "forward", "backward", "optimizer_step"}
    assert bd.peak_allocated_bytes == max(bd.phases[p] for p in ("forward", "backward", "optimizer_step"))
    assert bd.peak_reserved_bytes == bd.device_total_bytes == bd.peak_allocated_bytes
    assert bd.extras["fits"] is True
    assert bd.parameters == bd.trainable_parameters > 0
    # after the step only weights, states (and the batch, the step counters) are left
    after = bd.extras["boundary_allocated_bytes"]
    assert after["after_optimizer_step"] >= c["weights"] + c["optimizer_states"]
    assert after["after_optimizer_step"] - c["weights"] - c["optimizer_states"] < 4096
    assert any("CPU run, tensor-level accounting" in n for n in bd.notes)


def test_gradients_are_counted_when_the_peak_is_in_backward_or_the_step():
    j = job(precision="32-true", optimizer="sgd")  # SGD has no state, so the peak is in backward
    bd = run(j)
    ref = reference_bytes(j)
    assert bd.components["optimizer_states"] == 0
    assert bd.extras["gradients_after_backward_bytes"] == ref["trainable"]
    if bd.peak_phase in ("backward", "optimizer_step"):
        assert bd.components["gradients"] == ref["trainable"]
    else:
        assert bd.components["gradients"] == 0


def test_lora_components():
    j = job(method="lora", lora_rank=4)
    bd = run(j)
    ref = reference_bytes(j)
    c = bd.components
    assert c["lora_adapters"] == ref["lora"] == ref["trainable"] > 0
    assert c["weights"] == ref["weights"]
    assert c["optimizer_states"] == 2 * ref["trainable"]
    assert bd.trainable_parameters * 4 == ref["trainable"]  # fp32 adapters
    assert bd.parameters > bd.trainable_parameters
    assert bd.extras["lora_parameters"] == bd.trainable_parameters
    assert sum(c.values()) == bd.peak_allocated_bytes


@pytest.mark.parametrize("name, factor", [("sgd-momentum", 1), ("lion", 1), ("adam", 2)])
def test_state_bytes_per_optimizer(name, factor):
    j = job(optimizer=name, precision="bf16-true")
    bd = run(j, steps=2)
    assert bd.components["optimizer_states"] == factor * reference_bytes(j)["trainable"]


def test_step_time_and_tokens_per_second():
    bd = run(job(), steps=3)
    ex = bd.extras
    assert len(ex["step_times_s"]) == 3 and ex["warmup_steps"] == 1
    assert ex["step_time_s"] > 0
    assert ex["tokens_per_s"] == pytest.approx(2 * 32 / ex["step_time_s"])


def test_one_step_measures_the_warm_up_and_says_so():
    bd = run(job(), steps=1)
    assert any("one step only" in n for n in bd.notes)


# ------------------------------------------------------------------------------------------- inference
def test_prefill_only_inference():
    j = job(task="infer", prompt_len=16)
    bd = run(j)
    assert set(bd.phases) == {"load", "prefill"} and bd.peak_phase == "prefill"
    assert bd.components["weights"] == reference_bytes(j)["weights"]
    assert bd.components["kv_cache"] == 0
    assert "optimizer_states" not in bd.components
    assert sum(bd.components.values()) == bd.peak_allocated_bytes


def test_generate_inference_sizes_the_kv_cache():
    j = job(task="infer", prompt_len=16, new_tokens=4, precision="bf16-true")
    bd = run(j)
    assert set(bd.phases) == {"load", "prefill", "decode"}
    # bf16 keys and values: 2 layers x 2 x batch 2 x 2 kv heads x head_dim 16 x 2 bytes = 512 bytes per token
    assert bd.extras["kv_cache_bytes"] == {"prefill": 512 * 16, "decode": 512 * 19}
    assert bd.components["kv_cache"] == bd.extras["kv_cache_bytes"][bd.peak_phase]
    assert bd.extras["tokens_per_step"] == 2 * 4


def test_a_user_module():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(256, 32)
            self.out = torch.nn.Linear(32, 256)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))

    j = job(model="my-tiny-module", precision="32-true", seq_len=8)
    model = Tiny()
    expected = sum(p.numel() * 4 for p in model.parameters())
    bd = measure(j, model=model, device="cpu", progress=False)
    assert bd.components["weights"] == expected  # built before measure, adopted by the tracker
    assert bd.components["optimizer_states"] == 2 * expected
    assert sum(bd.components.values()) == bd.peak_allocated_bytes


# ------------------------------------------------------------------------------------------- records
def test_record_file_roundtrip(tmp_path):
    j = job()
    out = tmp_path / "rec" / "run.json"
    bd = run(j, out=out)
    data = json.loads(out.read_text())
    assert set(data) == {"job", "breakdown", "env", "created", "memfit_version"}
    assert data["env"]["torch"] == torch.__version__.split("+")[0] or data["env"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert "hostname" not in json.dumps(data["env"]).lower()
    j2, bd2, _ = read_record(out)
    assert j2 == j
    assert bd2 == Breakdown.from_dict(json.loads(bd.to_json()))
    assert bd2.components == bd.components


# ------------------------------------------------------------------------------------------- out of memory
def test_out_of_memory_is_an_answer(monkeypatch):
    real = E.train_step
    calls = []

    def failing(j, model, opt, batch, scaler=None, hooks=None):
        calls.append(1)
        if len(calls) == 2:
            hooks.on_phase("forward")
            hooks.on_phase("backward")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.00 GiB is free.")
        return real(j, model, opt, batch, scaler, hooks)

    monkeypatch.setattr(E, "train_step", failing)
    bd = run(job())
    ex = bd.extras
    assert ex["fits"] is False and ex["oom_phase"] == "backward" == bd.peak_phase
    assert ex["oom_request_bytes"] == 2 * 2**30
    assert bd.notes[0].startswith("does not fit: it needed more than ")
    assert "at backward; largest component so far: optimizer_states" in bd.notes[0]
    assert sum(bd.components.values()) == bd.peak_allocated_bytes
    assert ex["steps_completed"] == 1


def test_out_of_memory_while_loading(monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(E, "build_model", failing)
    bd = run(job())
    assert bd.extras["fits"] is False and bd.extras["oom_phase"] == "load"
    assert "at load" in bd.notes[0]


def test_other_errors_are_not_swallowed(monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(E, "build_model", failing)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(job())


# ------------------------------------------------------------------------------------------- sweep, CLI
def test_precision_sweep(tmp_path):
    out = tmp_path / "sweep.json"
    results = measure_sweep(job(), precisions=("tf32", "bf16-true"), spec=spec(), device="cpu", progress=False,
                            steps=2, out=out)
    assert [label for label, _ in results] == ["tf32", "bf16-true"]
    assert results[0][1].job["precision"] == "32-true" and results[0][1].extras["tf32"] is True
    assert results[1][1].components["weights"] * 2 == pytest.approx(results[0][1].components["weights"], abs=256)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
    assert [r["label"] for r in json.loads(out.read_text())] == ["tf32", "bf16-true"]


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "tiny" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(LLAMA))
    return p


def _parser():
    from memfit.commands import measure as cmd

    ap = argparse.ArgumentParser()
    cmd.add_parser(ap.add_subparsers())
    return ap


def test_command_json_and_table(config_file, capsys, tmp_path):
    ap = _parser()
    args = ap.parse_args(["measure", str(config_file), "--seq-len", "16", "--cpu", "--json", "--steps", "2",
                          "--out", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measurement"] == "cpu-tensors" and data["extras"]["fits"] is True
    assert (tmp_path / "r.json").is_file()
    args = ap.parse_args(["measure", str(config_file), "--seq-len", "16", "--cpu", "--steps", "2"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "optimizer_states" in text and "peak allocated" in text and "cpu-tensors" in text


def test_command_out_of_memory_exits_1(config_file, capsys, monkeypatch):
    def failing(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(E, "build_model", failing)
    ap = _parser()
    args = ap.parse_args(["measure", str(config_file), "--cpu"])
    assert args.func(args) == 1
    assert "does not fit: it needed more than" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- batch script
def test_run_records_on_a_tiny_yaml(config_file, tmp_path):
    jobs = tmp_path / "tiny-jobs.yaml"
    jobs.write_text(f"- name: tiny-train\n  job: {{model: {config_file}, seq_len: 16, batch_size: 2}}\n  steps: 2\n"
                    f"- name: missing-model\n  job: {{model: {tmp_path / 'nope.json'}, seq_len: 16}}\n")
    out_dir = tmp_path / "out"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the script must find memfit in <repo>/src on its own
    res = subprocess.run([sys.executable, str(REPO / "validation" / "run_records.py"), str(jobs), "--out",
                          str(out_dir), "--cpu", "--timeout", "120"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), check=False)
    assert res.returncode == 1, res.stderr  # one job failed
    records = json.loads((out_dir / "records-tiny-jobs.json").read_text())
    assert [r["name"] for r in records] == ["tiny-train", "missing-model"]
    ok, bad = records
    assert ok["status"] == "ok" and ok["breakdown"]["measurement"] == "cpu-tensors"
    assert {"job", "breakdown", "env", "created", "memfit_version", "wall_s", "steps"} <= set(ok)
    assert ok["steps"] == 2
    assert bad["status"] == "error" and "nope.json" in bad["error"]["stderr_tail"]
    assert "tiny-train" in res.stdout and "alloc" in res.stdout
    log = (out_dir / "log.txt").read_text()
    assert "tiny-train" in log and "missing-model" in log
    # --only names entries of the file; an unknown one is refused before anything runs
    res = subprocess.run([sys.executable, str(REPO / "validation" / "run_records.py"), str(jobs), "--out",
                          str(out_dir), "--cpu", "--only", "nope"], capture_output=True, text=True, env=env,
                         check=False)
    assert res.returncode == 2 and "no entry named nope" in res.stderr
