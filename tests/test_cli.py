"""The command line: thin over the library, one-line errors, non-zero exits, no tracebacks."""

import json
import subprocess
import sys

import pytest

from memfit.cli import main


def run(*args):
    p = subprocess.run([sys.executable, "-m", "memfit.cli", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("args, message", [
    (["estimate", "llama-9000"], "unknown model 'llama-9000'"),
    (["estimate", "gpt2", "--batch-size", "0"], "batch_size must be a whole number >= 1"),
    (["estimate", "gpt2", "--method", "lora", "--lora-rank", "0"], "lora_rank must be a whole number >= 1"),
    (["estimate", "gpt2", "--gpus", "2", "--gpus-per-node", "8"], "gpus_per_node (8) is more than gpus (2)"),
    (["estimate", "gpt2", "--precision", "fp12"], "precision must be one of"),
    (["estimate", "--job", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_input_is_one_line(args, message):
    code, out, err = run(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": "big"}')
    code, out, err = run("estimate", str(cfg))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_json_keys(capsys):
    assert main(["estimate", "llama-3.2-1b", "--precision", "bf16-true", "--batch-size", "2", "--seq-len", "1024",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("parameters", "trainable_parameters", "peak_allocated_bytes", "peak_reserved_bytes",
                "device_total_bytes", "components", "peak_phase"):
        assert key in data
    assert data["parameters"] == 1_235_814_400
    assert sum(data["components"].values()) == data["peak_allocated_bytes"]


def test_table_and_job_file(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: qwen3-4b\nmethod: lora\nlora_rank: 16\nprecision: bf16-true\nbatch_size: 4\nseq_len: 1024\n")
    assert main(["estimate", "--job", str(job)]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "device total" in out and "lora_adapters" in out


def test_max_batch_size(capsys):
    assert main(["estimate", "llama-3.2-1b", "--precision", "bf16-true", "--seq-len", "2048", "--max-batch-size",
                 "--gpu-memory", "80GiB", "--json"]) == 0
    n = json.loads(capsys.readouterr().out)["max_batch_size"]
    assert n >= 1


def test_models_lists_registry(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 40


def test_estimate_imports_no_torch():
    code = ("import sys, memfit.cli as c; c.main(['estimate','llama-3.1-8b','--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_a_closed_pipe_ends_quietly():
    """`memfit models | head -1`: the reader leaves early; no traceback, a non-zero exit."""
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "  # stdout: a pipe nobody reads
            "from memfit.cli import main; sys.exit(main(['serve', 'llama-3.1-8b', '--gpu', 'h100-80gb']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 141  # serve prints with print(); rich's tables end a closed pipe with 1 themselves
