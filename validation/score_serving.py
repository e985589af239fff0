"""Score `memfit serve` against published vLLM / SGLang start-up logs (validation/serving/logs/*.json).

For each log: memfit's KV cache tokens (and blocks, concurrency, weights, KV memory) next to the printed
ones, from the log's model, GPU, version and flags only. Logs are skipped, with the reason, when memfit
cannot resolve the model offline, the card's memory is neither printed nor in the GPU catalog, or the
engine version is outside what memfit follows. The logs are split once, before their errors were looked
at, into a held-out half and a tuning half (validation/serving/holdout.json, rule in ``is_held_out``): the
logs whose figures set one of memfit's constants (``FITTING``) are in the tuning half, and rules may be
fitted on tuning logs only. The bars are read on the held-out half; the tuning half is reported on its own.

Run: PYTHONPATH=src python validation/score_serving.py [--json OUT] [--logs DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
LOGS = ROOT / "validation" / "serving" / "logs"
GiB = 1 << 30

#: Logs whose printed figures set a constant of memfit.serve (see the constants' docstrings).
FITTING = {
    "vllm-gh10517-a": "CUDA_CONTEXT_V063_BYTES (vLLM 0.6.3-0.6.4 non-torch memory at TP 1)",
    "vllm-gh10517-b": "CUDA_CONTEXT_V063_BYTES (same run, other max_model_len)",
    "sglang-docs-llama31-8b-send-request": "sglang PRELOAD_TP1_BYTES (memory used before weights load at TP 1)",
    "sglang-myr1-r1-distill-qwen7b-3090": "sglang PRELOAD_TP1_BYTES (memory used before weights load at TP 1)",
    "sglang-llmsinclouds-qwq32b-l4": "sglang PRELOAD_TP_BYTES (memory used before weights load at TP > 1, L4 total from the GPU catalog)",
    "vllm-llmd-llama31-8b-h100": "SAMPLER_V1_BYTES_PER_LOGIT (V1 profile-run sampler peak)",
    "vllm-llmd-qwen3-0.6b-h100": "SAMPLER_V1_BYTES_PER_LOGIT (V1 profile-run sampler peak)",
    "vllm-rldecision-qwen25-05b-bnb-3090": "NON_TORCH_TP1_CONSUMER_BYTES (V0/V1 non-torch memory at TP 1, consumer cards)",
    "vllm-llmd-qwen3-32b-2xh100-tp2": "NON_TORCH_TP_BYTES (V1 non-torch memory at TP > 1, data-centre cards)",
    "vllm-guardkit-qwen3-30b-a3b-fp8-gb10": "vllm.unified_memory (GB10 takes the small-card defaults: its printed "
                                            "max_num_batched_tokens=2048)",
    # held out until issue 13's brief printed their errors (2026-12-02, branch serve-fix); used there to check the
    # FlashInfer sampler moment and which cards take NON_TORCH_TP_BYTES
    "vllm-dennislee-qwen2-7b-a100-80gb-u25": "memory.sampler_bytes_per_logit (V1 FlashInfer top-k/top-p, A100, TP 1)",
    "vllm-dennislee-qwen2-7b-a100-80gb-u50": "memory.sampler_bytes_per_logit (V1 FlashInfer top-k/top-p, A100, TP 1)",
    "vllm-dennislee-qwen2-7b-2xa100-80gb-tp2-u25": "NON_TORCH_TP_CONSUMER_BYTES off Hopper (A100 TP 2, FlashInfer sampler)",
    "vllm-dennislee-qwen2-7b-2xa100-80gb-tp2-u50": "NON_TORCH_TP_CONSUMER_BYTES off Hopper (A100 TP 2, FlashInfer sampler)",
    "vllm-dennislee-qwen2-7b-2xa100-40gb-tp2-2nodes": "NON_TORCH_TP_CONSUMER_BYTES off Hopper (A100 TP 2 over two nodes, "
                                                      "native sampler)",
    # held out by holdout-3.json until its first score (-21.65%) sent session serve6 to vLLM's per-card default
    # sequence count (``_set_default_args_v1``, read from the v0.8.0-v0.9.2 wheels); holdout-3.json "moved"
    "vllm-tokenkaki-qwen3-8b-a100-40gb-v092": "vllm.default_limits (V1 per-card max_num_seqs: 256 on cards below "
                                              "70 GiB from v0.8.4, read from the wheels; found through this log)",
    # held out until issue 13's brief (2026-12-02, branch serve-moe) printed its error (-5.5%); used there to check
    # the symmetric INT4 layout (no zero points) of compressed-tensors W4A16 experts
    "vllm-recipes-kimi-k2-thinking-tp8": "serve.resolve_quantization int4-sym (compressed-tensors W4A16, symmetric: "
                                         "no zero points)",
}

HOLDOUT = ROOT / "validation" / "serving" / "holdout.json"


#: Later collections, each written before any of its logs was scored: every log listed there is held out.
LATER_HOLDOUTS = ("holdout-2.json", "holdout-3.json")


@functools.lru_cache(maxsize=1)
def _later_held_out() -> frozenset[str]:
    """The logs of ``holdout-2.json`` (session 5) and ``holdout-3.json`` (session serve6): every log collected after
    holdout.json was written, all held out."""
    out: set[str] = set()
    for name in LATER_HOLDOUTS:
        p = Path(__file__).resolve().parent / "serving" / name
        try:
            out.update(json.loads(p.read_text())["held_out"])
        except (OSError, ValueError, KeyError):
            continue
    return frozenset(out)


def later_held_out_set(name: str) -> frozenset[str]:
    """The ids one later holdout file lists (``holdout-3.json``): to report a collection on its own."""
    p = Path(__file__).resolve().parent / "serving" / name
    try:
        return frozenset(json.loads(p.read_text())["held_out"])
    except (OSError, ValueError, KeyError):
        return frozenset()


def is_held_out(log_id: str) -> bool:
    """The split rule written down in holdout.json before scoring: a log outside ``FITTING`` whose id's
    SHA-256 is even; and every log of holdout-2.json / holdout-3.json (collected later, all held out)."""
    import hashlib

    if log_id in _later_held_out():
        return True
    return log_id not in FITTING and int(hashlib.sha256(log_id.encode()).hexdigest(), 16) % 2 == 0


#: How a log's flag names map to memfit.serve's keywords.
_FLAG_MAP = {
    "tensor_parallel_size": "tensor_parallel", "pipeline_parallel_size": "pipeline_parallel",
    "gpu_memory_utilization": "gpu_memory_utilization", "mem_fraction_static": "mem_fraction_static",
    "max_model_len": "max_model_len", "context_length": "max_model_len", "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens", "chunked_prefill_size": "max_num_batched_tokens",
    "kv_cache_dtype": "kv_cache_dtype", "quantization": "quantization", "dtype": "dtype",
    "enforce_eager": "enforce_eager", "block_size": "block_size", "page_size": "block_size",
    "cuda_graph_max_bs": "cuda_graph_max_bs", "data_parallel_size": "data_parallel",
    "enable_expert_parallel": "enable_expert_parallel", "enable_lora": "enable_lora", "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank", "mla_cuda_mem_align_kv_cache": "mla_cuda_mem_align_kv_cache",
    "sampler": "sampler",
}
_QUANT_NAMES = {"fp8": "fp8", "awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq",
                "bitsandbytes": "bitsandbytes", "compressed-tensors": None, "mxfp4": "mxfp4", "none": "none"}


def infer_version(log: dict[str, Any]) -> tuple[str | None, str]:
    """The engine version to apply: the log's own (when it names a release number; a PR branch without one,
    "dev (PR #10511, 2024-12)", counts as not stated), else one read from the log lines' format (vLLM only):
    "Memory profiling results: total_gpu_memory=" is the V0 worker of v0.6.3-v0.6.4 (PR #9352); "the
    current vLLM instance can use" is v0.6.5-v0.8 (PR #10511); "Available KV cache memory" is V1 (v0.8+)."""
    import re

    stated = str(log.get("engine_version") or "")
    if re.search(r"\d+\.\d+", stated):
        return stated, "stated"
    text = log.get("log_excerpt") or ""
    if log.get("engine") != "vllm":
        if (log.get("flags") or {}).get("mem_fraction_static"):
            return "0.4", "assumed 0.4 (mem_fraction_static stated, so the version's default does not matter)"
        return None, "unknown"
    if "Memory profiling results: total_gpu_memory=" in text:
        return "0.6.3", "inferred from the log format (v0.6.3-v0.6.4)"
    if "the current vLLM instance can use" in text:
        return "0.7", "inferred from the log format (v0.6.5-v0.8)"
    if "Available KV cache memory" in text:
        return "0.9", "inferred from the log format (V1, v0.8+)"
    return None, "unknown"


def resolve_gpu(name: str):
    """The catalog card of a log's GPU name ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3",
    "NVIDIA GeForce RTX 4090 (inferred)"): the name as written, then without the vendor words and any
    parenthesis, then its first words. None when the catalog has no such card."""
    import re

    from memfit.errors import MemfitError
    from memfit.gpus import get_gpu

    base = re.sub(r"\(.*?\)", " ", name or "")
    base = re.sub(r"\b(NVIDIA|GeForce|Tesla)\b", " ", base, flags=re.I).strip()
    words = base.replace("-", " ").split()
    candidates = [name, base, " ".join(words)] + [" ".join(words[:n]) for n in range(len(words) - 1, 0, -1)]
    for cand in candidates:
        if not cand.strip():
            continue
        try:
            return get_gpu(cand)
        except MemfitError:
            continue
    return None


#: Flags that change the memory split in ways memfit.serve does not model: such logs are skipped.
UNMODELLED = ("speculative_model", "speculative_config", "speculative_algorithm",
              "kv_transfer_config", "cpu_offload_gb", "kv_cache_memory_bytes", "num_gpu_blocks_override",
              "enable_dp_attention", "max_total_tokens")


def _kwargs(log: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    kw: dict[str, Any] = {}
    flags = log.get("flags") or {}
    for name in UNMODELLED:
        v = flags.get(name)
        if v not in (None, False, 0, 1, ""):
            return kw, f"{name}={v!r} is not modelled by memfit serve"
    for name, value in flags.items():
        if value is None or name not in _FLAG_MAP:
            continue
        key = _FLAG_MAP[name]
        if key == "quantization":
            q = _QUANT_NAMES.get(str(value).lower(), "unknown")
            if q == "unknown":
                return kw, f"quantization {value!r} is not counted"
            if q is None:
                continue  # read from the model's quantization_config
            value = q
        if key == "dtype" and str(value) in ("half", "float16", "bfloat16", "auto", "bf16", "fp16", "float32"):
            value = str(value)
        kw[key] = value
    return kw, None


def quantization_from_id(model_id: str) -> str | None:
    """The checkpoint format a Hub id names (``...-FP8``, ``...-AWQ``, ``...-GPTQ-Int4``, ``...-bnb-4bit``,
    ``...-w8a8``, ``...-w4a16``): vLLM and SGLang read it from the checkpoint's ``quantization_config``, which
    a registry entry shared with the base model lacks."""
    low = model_id.lower()
    for key, name in (("fp8", "fp8"), ("awq", "awq"), ("gptq", "gptq"), ("bnb-4bit", "bitsandbytes"),
                      ("w8a8", "w8a8"), ("w4a16", "w4a16")):
        if key in low:
            return name
    return None


def score_log(log: dict[str, Any]) -> dict[str, Any]:
    """One log's row: memfit vs printed, or ``skipped`` with the reason."""
    from memfit.errors import MemfitError
    from memfit.serve import serve

    row: dict[str, Any] = {"id": log.get("id"), "engine": log.get("engine"), "model": log.get("model"),
                           "gpu": log.get("gpu"), "fitting": log.get("id") in FITTING,
                           "held_out": is_held_out(str(log.get("id")))}
    if log.get("usable") is False:
        return {**row, "skipped": "marked not usable by its collector (see its notes)"}
    printed = log.get("printed") or {}
    want = printed.get("kv_cache_tokens") or printed.get("max_total_num_tokens")
    if not want and not printed.get("kv_cache_memory_gib"):
        return {**row, "skipped": "the log prints neither KV cache tokens nor KV cache memory"}
    version, how = infer_version(log)
    if version is None:
        return {**row, "skipped": "engine version neither stated nor recognizable from the log lines"}
    row["engine_version"], row["version_source"] = version, how
    from memfit.serve import SUPPORTED_VERSIONS, claims_version

    try:
        claimed = claims_version(log["engine"], version)
    except MemfitError:
        return {**row, "skipped": f"engine version {version!r} names no release"}
    if not claimed:
        lo, hi = SUPPORTED_VERSIONS[log["engine"]]
        return {**row, "skipped": f"{log['engine']} {version} is outside the versions memfit claims "
                                  f"({lo[0]}.{lo[1]}-{hi[0]}.{hi[1]})"}
    kw, why = _kwargs(log)
    if why:
        return {**row, "skipped": why}
    if log.get("engine_mode"):
        kw["engine_mode"] = log["engine_mode"] if log.get("engine") == "vllm" else None
        if kw["engine_mode"] is None:
            kw.pop("engine_mode")
    gpu_kw: dict[str, Any] = {}
    if printed.get("total_gpu_memory_gib"):
        gpu_kw["gpu_memory"] = int(printed["total_gpu_memory_gib"] * GiB)
        gpu_kw["gpu_name"] = log.get("gpu") or ""
    else:
        card = resolve_gpu(log.get("gpu") or "")
        if card is None:
            return {**row, "skipped": f"GPU {log.get('gpu')!r}: memory not printed and not in the GPU catalog"}
        gpu_kw["gpu_memory"] = card.memory_bytes
        gpu_kw["gpu_name"] = card.title
    if "quantization" not in kw:
        from memfit.models import load_model

        try:
            spec = load_model(log["model"])
            has_qc = bool((spec.config or {}).get("quantization_config") or getattr(spec, "checkpoint_quantization", ""))
        except MemfitError as exc:
            return {**row, "skipped": str(exc)}
        named = quantization_from_id(log["model"])
        if named and not has_qc:
            kw["quantization"] = named
            row["quantization_source"] = f"{named}, from the model id"
    try:
        est = serve(log["model"], engine=log["engine"], engine_version=version, **gpu_kw, **kw)
    except MemfitError as exc:
        return {**row, "skipped": str(exc)}
    row["memfit"] = {"kv_cache_tokens": est.kv_cache_tokens, "num_gpu_blocks": est.num_gpu_blocks,
                     "max_concurrency": est.max_concurrency, "weights_gib": round(est.weights_bytes / GiB, 3),
                     "kv_cache_memory_gib": round(est.kv_cache_bytes / GiB, 3),
                     "activation_peak_gib": round(est.activation_peak_bytes / GiB, 3), "rule": est.rule}
    row["printed"] = {k: printed.get(k) for k in ("kv_cache_tokens", "num_gpu_blocks", "max_concurrency",
                                                  "weights_gib", "kv_cache_memory_gib", "activation_peak_gib")}
    row["printed"]["kv_cache_tokens"] = want or None
    row["error"] = {}
    for k, v in row["memfit"].items():
        p = row["printed"].get(k)
        if isinstance(p, (int, float)) and p and isinstance(v, (int, float)):
            row["error"][k] = round((v - p) / p, 4)
    return row


def load_logs(folder: Path = LOGS) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            log = json.load(f)
        log.setdefault("id", path.stem)
        out.append(log)
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |error| and share within 10% of KV tokens over the scored held-out logs, and on their own over
    the tuning logs (``fitting``: those that set a constant; ``tuning``: all scored logs not held out)."""
    def stats(sel):
        errs = [abs(r["error"]["kv_cache_tokens"]) for r in sel]
        if not errs:
            return {"count": 0}
        return {"count": len(errs), "median_abs_error": round(statistics.median(errs), 4),
                "within_10pct": round(sum(e <= 0.10 for e in errs) / len(errs), 4), "max_abs_error": round(max(errs), 4)}

    scored = [r for r in rows if "error" in r and "kv_cache_tokens" in r["error"]]
    mem = [r for r in rows if "error" in r and "kv_cache_memory_gib" in r["error"] and r["held_out"]]
    mem_errs = [abs(r["error"]["kv_cache_memory_gib"]) for r in mem]
    return {"logs": len(rows), "skipped": sum(1 for r in rows if "skipped" in r),
            "held_out": stats([r for r in scored if r["held_out"]]),
            "tuning": stats([r for r in scored if not r["held_out"]]),
            "fitting": stats([r for r in scored if r["fitting"]]),
            "kv_memory_held_out": {"count": len(mem_errs),
                                   "median_abs_error": round(statistics.median(mem_errs), 4) if mem_errs else None,
                                   "within_10pct": round(sum(e <= 0.1 for e in mem_errs) / len(mem_errs), 4)
                                   if mem_errs else None}}


def score(folder: Path = LOGS) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # resolve models offline: registry, local configs, hub cache
    rows = [score_log(log) for log in load_logs(folder)]
    return {"rows": rows, "summary": summarize(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logs", type=Path, default=LOGS)
    ap.add_argument("--json", type=Path, help="also write the rows and summary here")
    args = ap.parse_args(argv)
    result = score(args.logs)
    print(f"{'log':40s} {'engine':14s} {'printed':>9s} {'memfit':>9s} {'error':>8s}  blocks / concurrency / weights")
    for r in result["rows"]:
        label = f"{r['engine']} {r.get('engine_version') or '?'}"
        if "skipped" in r:
            print(f"{r['id']:40s} {label:14s} skipped: {r['skipped']}")
            continue
        p, m, err = r["printed"], r["memfit"], r["error"]
        if p["kv_cache_tokens"] is None:
            print(f"{r['id']:40s} {label:14s} {'-':>9} {m['kv_cache_tokens']:>9} {'-':>8}  KV memory "
                  f"{m['kv_cache_memory_gib']} vs {p['kv_cache_memory_gib']} GiB "
                  f"({err.get('kv_cache_memory_gib', 0):+.2%})"
                  f"{' (fitting)' if r['fitting'] else (' (held out)' if r['held_out'] else ' (tuning)')}")
            continue
        extra = "  ".join(f"{k} {m[k]} vs {p[k]}" for k in ("num_gpu_blocks", "max_concurrency", "weights_gib")
                          if p.get(k) is not None)
        tag = " (fitting)" if r["fitting"] else (" (held out)" if r["held_out"] else " (tuning)")
        print(f"{r['id']:40s} {label:14s} {p['kv_cache_tokens']:>9} {m['kv_cache_tokens']:>9} "
              f"{err['kv_cache_tokens']:>+8.2%}  {extra}{tag}")
    s = result["summary"]
    for name in ("held_out", "tuning", "fitting"):
        st = s[name]
        if st["count"]:
            print(f"{name}: {st['count']} logs, KV tokens median |error| {st['median_abs_error']:.2%}, "
                  f"within 10%: {st['within_10pct']:.0%}, max {st['max_abs_error']:.2%}")
        else:
            print(f"{name}: no scored logs")
    for name in LATER_HOLDOUTS[1:]:
        ids = later_held_out_set(name)
        st = summarize([r for r in result["rows"] if r.get("id") in ids])["held_out"]
        if st["count"]:
            print(f"held_out ({name} alone): {st['count']} logs, KV tokens median |error| {st['median_abs_error']:.2%}, "
                  f"within 10%: {st['within_10pct']:.0%}, max {st['max_abs_error']:.2%}")
    km = s["kv_memory_held_out"]
    if km["count"]:
        print(f"KV cache memory (GiB), held out: {km['count']} logs, median |error| {km['median_abs_error']:.2%}, "
              f"within 10%: {km['within_10pct']:.0%}")
    print(f"{s['logs']} logs, {s['skipped']} skipped")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
