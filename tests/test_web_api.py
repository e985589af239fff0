"""The web API through FastAPI's test client: every number equals the library's (exact: the API returns
what `memfit estimate --json` prints, built by the same function), bad requests are 4xx with one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from memfit import Job, estimate  # noqa: E402
from memfit.cli import main  # noqa: E402
from memfit.web import adapter, create_app  # noqa: E402
from memfit.web.app import MAX_BODY_BYTES, STATIC  # noqa: E402

REGISTRY = Path(__file__).resolve().parents[1] / "src" / "memfit" / "models" / "registry"


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app())


def _cli_json(capsys, argv):
    main(argv)
    return json.loads(capsys.readouterr().out)


JOBS = [
    ({"model": "gpt2"}, None),
    ({"model": "gpt2", "batch_size": 4, "seq_len": 1024, "gradient_checkpointing": True}, "rtx-4090"),
    ({"model": "llama-3.2-1b", "method": "lora", "optimizer": "adamw-8bit"}, "a100-40gb"),
    ({"model": "qwen2.5-0.5b", "task": "infer", "prompt_len": 256, "new_tokens": 64}, None),
    ({"model": "llama-3.2-1b", "gpus": 4, "strategy": "zero3"}, "rtx-4090"),
]


@pytest.mark.parametrize("job,gpu", JOBS)
def test_estimate_equals_cli_json_and_library(client, capsys, job, gpu):
    body = {"job": job} | ({"gpu": gpu} if gpu else {})
    r = client.post("/api/estimate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    argv = ["estimate", job["model"], "--json"]
    for k, v in job.items():
        if k == "model":
            continue
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    if gpu:
        argv += ["--gpu", gpu]
    assert got == _cli_json(capsys, argv)  # exact: the same function builds both
    bd = estimate(Job.from_dict(job))
    assert got["components"] == bd.components
    assert got["device_total_bytes"] == bd.device_total_bytes
    assert got["phases"] == bd.phases
    if gpu:
        from memfit.commands.estimate import _estimate  # the engine's own verdict where it takes the card
        from memfit.gpus import get_gpu
        from memfit.verdict import verdict

        card = get_gpu(gpu).memory_bytes
        v = verdict(_estimate(Job.from_dict(job), card), card)
        assert (got["fits"], got["gpu_memory_bytes"], got["headroom_bytes"]) == (
            v["fits"], v["gpu_memory_bytes"], v["headroom_bytes"])


def test_gpu_memory_with_unit(client):
    r = client.post("/api/estimate", json={"job": {"model": "gpt2"}, "gpu_memory": "1GiB"})
    assert r.status_code == 200
    d = r.json()
    assert d["gpu_memory_bytes"] == 1 << 30
    assert d["fits"] == (d["device_total_bytes"] <= 1 << 30)


@pytest.mark.parametrize("body,pattern", [
    ({"job": {"model": "gpt2", "batch_size": 0}}, r"batch_size"),
    ({"job": {"model": "no-such-model-xyz"}}, r"unknown model"),
    ({"job": {"model": "meta-llama/NotThere"}}, r"--allow-hub"),
    ({"job": {"model": "/etc/passwd"}}, r"reads no files"),
    ({"job": {"model": "gpt2"}, "gpu": "no-such-card"}, r"unknown GPU"),
    ({"job": {"model": "gpt2"}, "gpu_memory": "24"}, r"no unit"),
    ({"job": {"model": "gpt2"}, "gpu": "rtx-4090", "gpu_memory": "24GiB"}, r"not both"),
    ({"job": {"model": "gpt2", "task": "dance"}}, r"task"),
    ({"job": {"model": "gpt2", "colour": "red"}}, r"colour"),
    ({"job": {"model": "gpt2"}, "config": {"model_type": "nonsense"}}, r"nonsense"),
    ({"job": {}}, r"model"),
])
def test_bad_requests_are_4xx_with_one_line(client, body, pattern):
    r = client.post("/api/estimate", json=body)
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and re.search(pattern, detail), detail


def test_config_path_confined_to_root(tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(REGISTRY / "gpt2.json", tmp_path / "m" / "config.json")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    shutil.copy(REGISTRY / "gpt2.json", outside)
    c = TestClient(create_app(root=tmp_path))
    ok = c.post("/api/estimate", json={"job": {"model": "m/config.json"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["components"] == estimate(Job(model=str(tmp_path / "m" / "config.json"))).components
    for ref in (str(outside), f"../{outside.name}", "/etc/passwd"):
        r = c.post("/api/estimate", json={"job": {"model": ref}})
        assert r.status_code == 400 and "root" in r.json()["detail"], r.text
    outside.unlink()


def test_pasted_config_gives_the_registry_numbers(client):
    config = json.loads((REGISTRY / "gpt2.json").read_text())
    r = client.post("/api/estimate", json={"job": {"model": "ignored", "batch_size": 2}, "config": config})
    assert r.status_code == 200, r.text
    ref = estimate(Job(model="gpt2", batch_size=2))
    assert r.json()["components"] == ref.components
    assert r.json()["device_total_bytes"] == ref.device_total_bytes
    assert r.json()["model"] == adapter.PASTED


def test_body_limit(client):
    r = client.post("/api/estimate", content=b" " * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_models_and_gpus(client):
    from memfit.gpus import all_gpus
    from memfit.models import list_models

    assert client.get("/api/models").json() == json.loads(json.dumps(list_models()))
    g = client.get("/api/gpus").json()
    assert [x["name"] for x in g] == [x.name for x in all_gpus()]
    assert [x["memory_bytes"] for x in g] == [x.memory_bytes for x in all_gpus()]


def test_plan_equals_library(client):
    if not adapter.plan_available():
        pytest.skip("memfit.plan is not in this tree")
    from memfit.plan import plan

    r = client.post("/api/plan", json={"job": {"model": "gpt2", "batch_size": 8}, "gpu": "rtx-4090", "top": 5})
    assert r.status_code == 200, r.text
    assert r.json() == json.loads(json.dumps(plan(Job(model="gpt2", batch_size=8), "rtx-4090", top=5).to_dict()))
    r = client.post("/api/plan", json={"job": {"model": "gpt2"}})
    assert r.status_code == 400 and "card" in r.json()["detail"]


def test_plan_missing_is_501(client, monkeypatch):
    monkeypatch.setattr(adapter, "plan_available", lambda: False)
    r = client.post("/api/plan", json={"job": {"model": "gpt2"}, "gpu": "rtx-4090"})
    assert r.status_code == 501 and "planner" in r.json()["detail"]


def test_openapi_lists_the_endpoints_and_job_fields(client):
    s = client.get("/openapi.json").json()
    assert {"/api/estimate", "/api/plan", "/api/models", "/api/gpus"} <= set(s["paths"])
    props = s["components"]["schemas"]["JobFields"]["properties"]
    assert {"model", "batch_size", "strategy", "gradient_checkpointing"} <= set(props)


def test_page_is_offline(client):
    """No CDN: every asset the page names is served by the package itself."""
    html = client.get("/").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") or a.startswith("data:") for a in assets), assets
    for a in assets:
        if a.startswith("/static/"):
            assert client.get(a).status_code == 200, a
    for f in STATIC.iterdir():
        assert not re.search(r"https?://", f.read_text()), f"{f.name} names an external URL"


def test_web_command_errors_are_one_line(capsys):
    assert main(["web", "--root", "/no/such/folder"]) == 2
    assert main(["web", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--root" in err and "--port" in err


def test_hub_mode_reads_no_local_paths(tmp_path, monkeypatch):
    """With --allow-hub, a name that happens to be a local folder is still not read (only files under root)."""
    (tmp_path / "secret").mkdir()
    shutil.copy(REGISTRY / "gpt2.json", tmp_path / "secret" / "config.json")
    monkeypatch.chdir(tmp_path)
    c = TestClient(create_app(allow_hub=True))
    r = c.post("/api/estimate", json={"job": {"model": "secret"}})
    assert r.status_code == 400 and "root" in r.json()["detail"], r.text


def test_serve_endpoint_answers_what_the_library_answers(client):
    """/api/serve returns memfit.serve.serve(...).to_dict() for the same model, engine, card and flags."""
    from memfit.serve import serve

    body = {"model": "llama-3.1-8b", "engine": "vllm", "gpu": "h100-80gb", "flags": {"max_model_len": 8192}}
    r = client.post("/api/serve", json=body)
    assert r.status_code == 200, r.text
    want = serve("llama-3.1-8b", engine="vllm", gpu="h100-80gb", max_model_len=8192).to_dict()
    assert r.json()["kv_cache_tokens"] == want["kv_cache_tokens"] > 0
    assert r.json()["num_gpu_blocks"] == want["num_gpu_blocks"]


def test_serve_endpoint_bad_input_is_one_line_4xx(client):
    c = client
    for body in ({"model": "llama-3.1-8b"}, {"model": "nosuchmodel-xyz", "gpu": "h100-80gb"},
                 {"model": "llama-3.1-8b", "gpu": "h100-80gb", "flags": {"no_such_flag": 1}},
                 {"model": "llama-3.1-8b", "gpu": "h100-80gb", "engine": "tgi"}):
        r = c.post("/api/serve", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert "\n" not in r.json()["detail"]


def test_serve_endpoint_takes_the_lora_and_data_parallel_flags(client):
    """/api/serve's flags include vLLM's LoRA slots and data parallelism, with the library's numbers."""
    from memfit.serve import serve

    flags = {"max_model_len": 8192, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "data_parallel": 2}
    r = client.post("/api/serve", json={"model": "qwen3-30b-a3b", "gpu": "h100-80gb", "flags": flags})
    assert r.status_code == 200, r.text
    want = serve("qwen3-30b-a3b", gpu="h100-80gb", **flags).to_dict()
    assert (r.json()["kv_cache_tokens"], r.json()["lora_bytes"], r.json()["data_parallel"]) == \
        (want["kv_cache_tokens"], want["lora_bytes"], 2)
    assert want["lora_bytes"] > 0
