"""Generators of valid and invalid inputs for memfit's public surfaces (the fuzz suite and its report).

Each generator takes a :class:`random.Random` and returns one input plus a callable that feeds it to
memfit. ``tests/test_fuzz.py`` drives them with hypothesis (``st.randoms``, derandomized, so CI is
deterministic and failures shrink); ``validation/fuzz_report.py`` drives them with seeded ``random.Random``
and counts what escapes as something other than a :class:`memfit.errors.MemfitError`.

The surfaces: ``Job.from_dict`` over every field, ``load_model`` on odd references and on mutated
config.json dicts and files (every registry entry is a seed), ``estimate`` and ``max_batch_size`` on the
jobs that validate, job files (YAML, JSON, binary), DeepSpeed and Accelerate configs, and the CLI in process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import random
import tempfile
from dataclasses import fields
from typing import Any, Callable

from memfit.job import (ATTENTIONS, FSDP_SHARDINGS, KV_CACHE_DTYPES, OPTIMIZERS, PRECISIONS, QUANTIZATIONS,
                        STRATEGIES, Job)

__all__ = ["SURFACES", "registry_configs", "JOB_FIELDS", "random_value", "tmpdir"]

JOB_FIELDS = [f.name for f in fields(Job)]
_CHOICES: dict[str, tuple] = {
    "task": ("train", "infer"), "method": ("full", "lora", "qlora"), "precision": PRECISIONS,
    "optimizer": OPTIMIZERS, "attention": ATTENTIONS, "kv_cache_dtype": KV_CACHE_DTYPES,
    "quantization": QUANTIZATIONS, "strategy": STRATEGIES, "offload": ("none", "optimizer", "optimizer+params"),
    "offload_device": ("cpu", "nvme"), "fsdp_sharding": FSDP_SHARDINGS, "lora_targets": ("all-linear",),
}
_BOOLS = ("gradient_checkpointing", "double_quant", "reshard_after_forward", "gradient_as_bucket_view",
          "sequence_parallel", "overlap_comm", "contiguous_gradients", "expandable_segments")
_SMALL_MODELS = ("gpt2", "opt-125m", "pythia-160m", "llama-3.2-1b", "bert-base-uncased", "qwen2.5-0.5b",
                 "gemma-3-1b", "olmoe-1b-7b", "deepseek-v2-lite", "mixtral-8x7b", "gemma-2-2b", "falcon-7b",
                 "distilbert-sst2", "phi-3-mini", "olmo-1b")

_tmp: list[str] = []
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network: Hub ids resolve from the cache or not at all


def tmpdir() -> pathlib.Path:
    """One scratch folder per process for the files the generators write."""
    if not _tmp:
        _tmp.append(tempfile.mkdtemp(prefix="memfit-fuzz-"))
    return pathlib.Path(_tmp[0])


def _registry_dir() -> pathlib.Path:
    import memfit.models as m

    return pathlib.Path(m.__file__).parent / "registry"


_CONFIGS: list[tuple[str, dict]] = []


def registry_configs() -> list[tuple[str, dict]]:
    """(name, config.json dict) of every registry entry."""
    if not _CONFIGS:
        d = _registry_dir()
        index = json.loads((d / "index.json").read_text())
        for name in index:
            _CONFIGS.append((name, json.loads((d / f"{name}.json").read_text())))
    return _CONFIGS


# ---------------------------------------------------------------------------------------------- values
def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """Any JSON/YAML-ish value, weighted toward the shapes that break parsers: huge and negative numbers,
    floats (inf, nan, 1e300), bools, empty and long strings, containers, and non-JSON Python objects."""
    k = rnd.randrange(22)
    if k == 0:
        return None
    if k == 1:
        return rnd.choice((True, False))
    if k == 2:
        return rnd.randint(-3, 3)
    if k == 3:
        return rnd.choice((2**31, 2**40, 2**63, 10**30, 10**400, -2**31))
    if k == 4:
        return rnd.randint(1, 4096)
    if k == 5:
        return rnd.choice((0.5, 1.0, 2.0, 1e300, -1e300, float("inf"), float("-inf"), float("nan"), 1e-300))
    if k == 6:
        return rnd.choice(("", " ", "auto", "none", "true", "8", "1e3", "-1", "0x10", "4.0", "∞", "\x00"))
    if k == 7:
        return "x" * rnd.choice((1, 50, 300, 5000))
    if k == 8:
        return rnd.choice(_SMALL_MODELS)
    if k == 9 and depth < 3:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    if k == 10 and depth < 3:
        return {rnd.choice(("a", "enabled", "device", 1, None)): random_value(rnd, depth + 1)
                for _ in range(rnd.randint(0, 3))}
    if k == 11:
        return rnd.choice((b"bytes", {1, 2}, (1, 2), pathlib.Path("gpt2"), object(), 3 + 4j))
    if k == 12:
        return 10 ** rnd.choice((20, 400, 5000)) - 1
    if k == 13:
        return rnd.choice(("q_proj", "q_proj,v_proj", ",", "nosuchmodule", "all-linear", "ALL-LINEAR"))
    if k == 14:
        return rnd.randint(0, 1 << 20)
    return rnd.choice((1, 2, 4, 8, 16, 64, 128, 512, 2048))


def _valid_value(rnd: random.Random, name: str) -> Any:
    if name in _CHOICES:
        return rnd.choice(_CHOICES[name])
    if name in _BOOLS:
        return rnd.choice((True, False))
    if name == "model":
        return rnd.choice(_SMALL_MODELS)
    if name in ("gpus", "gpus_per_node", "tensor_parallel", "pipeline_parallel", "expert_parallel"):
        return rnd.choice((1, 1, 2, 4, 8))
    if name in ("batch_size", "lora_rank", "pipeline_microbatches"):
        return rnd.choice((1, 2, 3, 8))
    if name in ("seq_len", "prompt_len"):
        return rnd.choice((1, 16, 128, 1024))
    if name == "new_tokens":
        return rnd.choice((0, 1, 16))
    if name in ("quant_group_size",):
        return rnd.choice((32, 64, 128))
    if name == "bucket_cap_mb":
        return rnd.choice((1, 25))
    if name.startswith("stage3_") or name in ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size"):
        return rnd.choice((None, 0, 1000, 100_000, 10**8)) if name.startswith("stage3_") else \
            rnd.choice((None, 10**6, 5 * 10**8))
    if name == "lora_alpha":
        return rnd.choice((None, 16, 32))
    return None


def job_dict(rnd: random.Random, *, valid_share: float = 0.5) -> dict:
    """A job mapping: a model and a few fields, each valid with probability ``valid_share``; sometimes an
    unknown or non-string key, sometimes no model."""
    d: dict[Any, Any] = {"model": rnd.choice(_SMALL_MODELS)}
    for name in rnd.sample(JOB_FIELDS, rnd.randint(0, 8)):
        d[name] = _valid_value(rnd, name) if rnd.random() < valid_share else random_value(rnd)
    r = rnd.random()
    if r < 0.03:
        d[rnd.choice((1, None, ("a",), 2.5))] = 1
    elif r < 0.05:
        d["no_such_field"] = 1
    elif r < 0.07:
        del d["model"]
    return d


def valid_job(rnd: random.Random) -> Job | None:
    """A job that validates (or None when the random draw is refused), small enough to estimate fast."""
    from memfit.errors import MemfitError

    for _ in range(8):
        d = {"model": rnd.choice(_SMALL_MODELS)}
        for name in rnd.sample(JOB_FIELDS, rnd.randint(0, 6)):
            if name != "model":
                d[name] = _valid_value(rnd, name)
        try:
            return Job.from_dict(d)
        except MemfitError:
            continue
    return None


# ---------------------------------------------------------------------------------------------- mutations
def mutate_config(rnd: random.Random, cfg: dict) -> Any:
    """A registry config.json with one to three mutations: a key deleted, set to a random value, a size
    blown up, the whole thing nested deep, or replaced by a non-mapping."""
    cfg = json.loads(json.dumps(cfg))
    r = rnd.random()
    if r < 0.02:
        return random_value(rnd)
    if r < 0.04:
        deep: Any = 1
        for _ in range(rnd.choice((50, 5000))):
            deep = [deep]
        cfg[rnd.choice(list(cfg))] = deep
        return cfg
    size_keys = [k for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)]
    for _ in range(rnd.randint(1, 3)):
        m = rnd.randrange(6)
        keys = list(cfg) or ["model_type"]
        if m == 0 and cfg:
            del cfg[rnd.choice(keys)]
        elif m == 1 and size_keys:
            cfg[rnd.choice(size_keys)] = rnd.choice((0, -1, 2**31, 10**12, 10**400, 1.5, 3.0, "12", None, True))
        elif m == 2:
            cfg[rnd.choice(keys)] = random_value(rnd)
        elif m == 3:
            cfg[rnd.choice(("sliding_window", "head_dim", "rope_scaling", "layer_types", "text_config",
                            "num_key_value_heads", "architectures", "torch_dtype", "mlp_only_layers",
                            "id2label", "use_sliding_window", "num_experts", "tie_word_embeddings"))] = \
                random_value(rnd)
        elif m == 4:
            cfg["model_type"] = rnd.choice(("llama", "gemma3", "qwen2_moe", "t5", "", None, 7, "deepseek_v3"))
        else:
            cfg[rnd.choice((1, None, 2.5, "extra")) if rnd.random() < 0.2 else "extra"] = random_value(rnd)
    return cfg


def _json_dump(obj: Any) -> str:
    """JSON text of ``obj`` with huge integers written out (Python refuses > 4300 digits by default)."""
    import sys

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(obj, default=repr, allow_nan=True)
    except RecursionError:
        return "[" * 100000
    finally:
        sys.set_int_max_str_digits(old)


# ---------------------------------------------------------------------------------------------- surfaces
def _call_job(rnd: random.Random) -> Callable[[], Any]:
    d = job_dict(rnd)

    def run():
        return Job.from_dict(d)
    run.input = d  # type: ignore[attr-defined]
    return run


def _call_estimate(rnd: random.Random) -> Callable[[], Any]:
    d = job_dict(rnd, valid_share=0.85)

    def run():
        from memfit.estimator import estimate

        return estimate(Job.from_dict(d))
    run.input = d  # type: ignore[attr-defined]
    return run


def _call_max_batch(rnd: random.Random) -> Callable[[], Any]:
    job = valid_job(rnd)
    cap = rnd.choice((0, 1, 2**30, 24 * 2**30, 80 * 2**30, 10**15, -5))

    def run():
        from memfit.estimator import max_batch_size

        if job is None:
            return None
        return max_batch_size(job, cap, limit=256)
    run.input = (job and job.to_dict(), cap)  # type: ignore[attr-defined]
    return run


def _model_ref(rnd: random.Random) -> Any:
    k = rnd.randrange(12)
    if k == 0:
        return pathlib.Path(rnd.choice(("gpt2", str(_registry_dir() / "gpt2.json"), "/nonexistent/config.json")))
    if k == 1:
        return "m" * rnd.choice((255, 300, 5000))
    if k == 2:
        return rnd.choice(("~nosuchuser/config.json", "~/nosuch", "~", "~nosuchuser"))
    if k == 3:
        return rnd.choice(("", " ", "\x00", "a\x00b", "/", ".", "..", "/dev/null", "/proc/self/status"))
    if k == 4:
        return rnd.choice((None, 7, b"gpt2", ["gpt2"], 1.5))
    if k == 5:
        return rnd.choice(("meta-llama/Nonexistent-Model-1B", "org/repo/extra", "a/b", "user/"))
    if k == 6:
        return str(_registry_dir())  # a folder with no config.json
    if k == 7:
        return rnd.choice(_SMALL_MODELS).upper()
    return rnd.choice(_SMALL_MODELS)


def _call_load_model(rnd: random.Random) -> Callable[[], Any]:
    ref = _model_ref(rnd)

    def run():
        from memfit.models import load_model

        return load_model(ref)
    run.input = ref  # type: ignore[attr-defined]
    return run


def _call_config(rnd: random.Random) -> Callable[[], Any]:
    name, base = rnd.choice(registry_configs())
    cfg = mutate_config(rnd, base)
    as_file = rnd.random() < 0.25
    job = valid_job(rnd) if rnd.random() < 0.1 else None

    def run():
        from memfit.estimator import estimate
        from memfit.models import load_model, spec_from_config

        if as_file:
            p = tmpdir() / f"cfg-{rnd.randrange(10**9)}" / "config.json"
            p.parent.mkdir()
            p.write_text(_json_dump(cfg))
            spec = load_model(str(p))
        else:
            spec = spec_from_config(cfg, name=name)
        if job is not None:
            return estimate(job, spec)
        return spec
    run.input = (name, cfg)  # type: ignore[attr-defined]
    return run


def _job_file_text(rnd: random.Random) -> tuple[str, bytes]:
    k = rnd.randrange(8)
    if k == 0:
        return ".bin", bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
    if k == 1:
        return ".yaml", rnd.choice((b"!!set {a, b}", b"!!python/object:os.system ls", b"- 1\n- 2",
                                    b"model: gpt2\n  bad: indent", b"a: &x [*x]", b"", b"~", b"123",
                                    b"model: gpt2\nbatch_size: !!float 1e300", b"model: gpt2\n1: 2",
                                    b"{model: gpt2, seq_len: 1e300}", b"\xff\xfe\x00"))
    if k == 2:
        return ".json", rnd.choice((b"{", b"[]", b"null", b"{\"model\": \"gpt2\", \"batch_size\": 1e999}",
                                    b"{\"job\": [1]}", b"\xff", b"NaN", b"{\"model\": \"gpt2\"}" * 2))
    if k == 3:
        return ".json", ("[" * rnd.choice((10, 100000))).encode()
    d = job_dict(rnd)
    d = {str(key) if not isinstance(key, (str, int, float, bool)) and key is not None else key: v
         for key, v in d.items()}
    ext = rnd.choice((".yaml", ".json", ".yml", ""))
    if ext == ".json":
        return ext, _json_dump({str(k): v for k, v in d.items()}).encode()
    import yaml

    try:
        return ext, yaml.safe_dump(json.loads(_json_dump({str(k): v for k, v in d.items()}))).encode()
    except (ValueError, TypeError, yaml.YAMLError):
        return ext, b"model: gpt2"


def _call_job_file(rnd: random.Random) -> Callable[[], Any]:
    ext, data = _job_file_text(rnd)
    name = f"job-{rnd.randrange(10**9)}{ext}"

    def run():
        from memfit.job import load_job

        p = tmpdir() / name
        p.write_bytes(data)
        return load_job(p if rnd.random() < 0.5 else str(p))
    run.input = (ext, data[:200])  # type: ignore[attr-defined]
    return run


def _ds_config(rnd: random.Random) -> dict:
    zero: dict[str, Any] = {"stage": rnd.choice((0, 1, 2, 3, 3, "auto", 4, "3", None, [3]))}
    for key in rnd.sample(("offload_optimizer", "offload_param", "reduce_bucket_size", "overlap_comm",
                           "stage3_param_persistence_threshold", "sub_group_size", "cpu_offload",
                           "contiguous_gradients", "stage3_prefetch_bucket_size"), rnd.randint(0, 4)):
        if key.startswith("offload"):
            zero[key] = rnd.choice(({"device": rnd.choice(("cpu", "nvme", "none", "gpu", None, 3))},
                                    random_value(rnd)))
        else:
            zero[key] = rnd.choice((random_value(rnd), "auto", 10**6, 1e5))
    cfg: dict[str, Any] = {"zero_optimization": zero if rnd.random() < 0.95 else random_value(rnd)}
    for key in rnd.sample(("bf16", "fp16", "train_micro_batch_size_per_gpu", "optimizer", "bfloat16"),
                          rnd.randint(0, 3)):
        if key == "optimizer":
            cfg[key] = rnd.choice(({"type": rnd.choice(("AdamW", "Adam", "SGD", "Lamb", 3, None)),
                                    "params": rnd.choice(({"adam_w_mode": False}, [1, 2], None, "x", {}))},
                                   random_value(rnd)))
        elif key in ("bf16", "fp16", "bfloat16"):
            cfg[key] = rnd.choice(({"enabled": rnd.choice((True, False, "auto", "true", 1))}, random_value(rnd)))
        else:
            cfg[key] = rnd.choice((random_value(rnd), "auto", 4))
    return cfg


def _accel_config(rnd: random.Random) -> dict:
    cfg: dict[str, Any] = {"distributed_type": rnd.choice(("FSDP", "DEEPSPEED", "MULTI_GPU", "NO", "TPU", 3, None))}
    for key in rnd.sample(("mixed_precision", "num_processes", "num_machines", "fsdp_config",
                           "deepspeed_config"), rnd.randint(0, 5)):
        if key == "mixed_precision":
            cfg[key] = rnd.choice(("bf16", "fp16", "no", "fp8", None, 3))
        elif key == "fsdp_config":
            cfg[key] = rnd.choice(({"fsdp_version": rnd.choice((1, 2, "2", None, 3.5)),
                                    "fsdp_sharding_strategy": rnd.choice((1, 2, 4, "FULL_SHARD", "x", None, 9)),
                                    "fsdp_reshard_after_forward": rnd.choice((True, "false", "SHARD_GRAD_OP", 3)),
                                    "fsdp_offload_params": rnd.choice((True, "true", False))},
                                   random_value(rnd)))
        elif key == "deepspeed_config":
            cfg[key] = rnd.choice(({"zero_stage": rnd.choice((0, 1, 2, 3, 5, "auto", None)),
                                    "offload_optimizer_device": rnd.choice(("cpu", "nvme", "none", None, 3)),
                                    "offload_param_device": rnd.choice(("cpu", "nvme", "none", None))},
                                   {"deepspeed_config_file": rnd.choice(("/nonexistent.json", 3, None, ""))},
                                   random_value(rnd)))
        else:
            cfg[key] = rnd.choice((1, 2, 8, 0, -1, "4", "auto", random_value(rnd)))
    return cfg


def _call_engine_config(rnd: random.Random) -> Callable[[], Any]:
    kind = rnd.choice(("deepspeed", "accelerate"))
    cfg = _ds_config(rnd) if kind == "deepspeed" else _accel_config(rnd)
    model = rnd.choice(_SMALL_MODELS)

    def run():
        from memfit.deepspeed_config import read_accelerate_config, read_deepspeed_config

        fields_ = (read_deepspeed_config if kind == "deepspeed" else read_accelerate_config)(cfg)
        return Job.from_dict({"model": model, **fields_})
    run.input = (kind, cfg)  # type: ignore[attr-defined]
    return run


# ---------------------------------------------------------------------------------------------- CLI
def command_parsers() -> dict[str, Any]:
    """Every subcommand's parser, as ``memfit.cli`` builds them (name -> parser)."""
    import argparse

    from memfit.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def value_actions(parser: Any) -> list[Any]:
    """The parser's arguments that take a value (flags and positionals; not -h, switches or --version)."""
    return [a for a in parser._actions if a.nargs != 0 and a.dest != "help"]


def value_kind(action: Any) -> str:
    """What an argument takes, read from its own ``type`` and ``choices``: choice, int, float or text."""
    if action.choices is not None:
        return "choice"
    t = action.type
    if t is None or t is str:
        return "text"
    for probe, kind in (("0.5", "float"), ("1", "int")):
        try:
            v = t(probe)
        except Exception:  # noqa: BLE001 - a type that refuses the probe is not of this kind
            continue
        if isinstance(v, float if kind == "float" else int) and not isinstance(v, bool):
            return kind
    return "text"


#: Values no argument of a kind takes: each must be memfit's one-line error. Text is never empty or blank
#: (``--host ''`` would bind every interface); counts are whole numbers below 10**20 (every count has a
#: ceiling, so a typo cannot make a search run for hours); floats are finite.
MALFORMED = {
    "text": ("", " ", "\t"),
    "choice": ("no-such-choice", "", " "),
    "int": ("abc", "", " ", "1.5", "1e3", "0x10", "nan", "99999999999999999999"),
    "float": ("abc", "", " ", "nan", "inf", "1e999"),
}
#: Numbers at and past the edges: each must end, soon, in an answer or a one-line error.
EXTREME = ("-1", "0", "99999999999999999999", "1e300")


def base_argv(command: str, parser: Any) -> list[str]:
    """The shortest valid argv of ``command``: a small model where it takes one, a card where it names one."""
    argv = [command]
    if any(a.dest == "model" and not a.option_strings for a in parser._actions):
        argv.append("gpt2")
    if "--gpu" in parser._option_string_actions:
        argv += ["--gpu", "h100-80gb"]
    return argv


def _with(base: list[str], action: Any, flag: str | None, value: str | None) -> list[str]:
    if action.option_strings:
        return base + ([flag] if value is None else [flag, value])
    if action.dest == "model":  # the positional model: replace the base's
        return [base[0], value, *base[2:]]
    return [base[0], value, *base[1:]]


def malformed_cases(command: str) -> list[tuple[list[str], tuple[str, ...]]]:
    """(argv, names the error should mention) for every argument of ``command`` that takes a value: each
    malformed value of its kind, each of its spellings, the flag with no value, and an unknown flag."""
    parser = command_parsers()[command]
    base = base_argv(command, parser)
    cases: list[tuple[list[str], tuple[str, ...]]] = []
    for a in value_actions(parser):
        names = (*a.option_strings, a.dest, a.dest.replace("_", "-"))
        flags = a.option_strings or [None]
        for i, v in enumerate(MALFORMED[value_kind(a)]):
            cases.append((_with(base, a, flags[i % len(flags)], v), names))
        for f in a.option_strings[1:]:  # the aliases (--tp, --context-length, ...) are parsed as the flag
            cases.append((_with(base, a, f, MALFORMED[value_kind(a)][0]), names))
        if a.option_strings and a.nargs is None:
            cases.append((_with(base, a, a.option_strings[0], None), names))  # the value left out
    cases.append((base + ["--no-such-flag"], ("--no-such-flag",)))
    cases.append((base + ["--no-such-flag", "1"], ("--no-such-flag",)))
    return cases


def extreme_cases(command: str) -> list[list[str]]:
    """argv with each numeric argument of ``command`` at each :data:`EXTREME` value."""
    parser = command_parsers()[command]
    base = base_argv(command, parser)
    return [_with(base, a, (a.option_strings or [None])[0], v)
            for a in value_actions(parser) if value_kind(a) in ("int", "float") for v in EXTREME]


class _Hang(Exception):
    pass


def run_cli(argv: list[str], seconds: int = 0) -> tuple[str, Any, str, str]:
    """``memfit.cli.main(argv)`` in this process: ("cli", exit code, stdout, stderr). ``seconds``: fail a call
    that runs longer (SIGALRM; 0: no limit). A web server is never started: ``uvicorn.run`` raises here."""
    import signal

    from memfit.cli import main

    uvicorn = None
    if argv[:1] == ["web"]:
        try:
            import uvicorn
        except ImportError:  # pragma: no cover - without memfit[web] the command stops before serving
            pass
    saved = uvicorn.run if uvicorn else None

    def no_server(*a: Any, **k: Any) -> None:
        raise AssertionError(f"memfit {' '.join(argv)} would start a web server")

    def hang(*a: Any) -> None:
        raise _Hang(f"memfit {' '.join(argv)!s:.300} ran past {seconds} s")

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, hang) if seconds else None
    if uvicorn:
        uvicorn.run = no_server
    try:
        if seconds:
            signal.alarm(seconds)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # main returns its code; a SystemExit here is a bug the check reports
                code = f"SystemExit({exc.code!r})"
    finally:
        if seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        if uvicorn:
            uvicorn.run = saved
    return ("cli", code, out.getvalue(), err.getvalue())


def one_line_error(result: Any, names: tuple[str, ...] = ()) -> str | None:
    """None when ``result`` (:func:`run_cli`'s) is memfit's usage or job error: a non-zero int exit, stderr
    exactly one non-empty line starting with ``memfit``, no traceback, and (``names``) one of the names
    in it; else what is wrong."""
    _, code, out, err = result
    if "Traceback" in err or "Traceback" in out:
        return "traceback in output"
    if not isinstance(code, int) or isinstance(code, bool) or code == 0:
        return f"exit {code!r}, not an error"
    lines = err.strip("\n").split("\n") if err.strip() else []
    if len(lines) != 1 or not lines[0].strip():
        return f"exit {code} with {len(lines)} stderr lines: {err[:300]!r}"
    if not lines[0].startswith("memfit"):
        return f"stderr does not start with 'memfit': {lines[0][:200]!r}"
    if names and not any(n in lines[0] for n in names):
        return f"the error names none of {names}: {lines[0][:200]!r}"
    return None


# the random CLI surface: estimate's own flags, read from its parser (flags that write files are drawn
# through the file branch below, or not at all: --plot would draw with matplotlib)
_CLI_FILE_FLAGS = ("--job", "--deepspeed", "--accelerate-config", "--plot")
_CLI_FLAGS: tuple[str, ...] = ()
_CLI_BOOLS: tuple[str, ...] = ()


def _cli_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    global _CLI_FLAGS, _CLI_BOOLS
    if not _CLI_FLAGS:
        p = command_parsers()["estimate"]
        _CLI_FLAGS = tuple(a.option_strings[0] for a in value_actions(p)
                           if a.option_strings and a.option_strings[0] not in _CLI_FILE_FLAGS)
        _CLI_BOOLS = tuple(f for a in p._actions if a.nargs == 0 and a.dest not in ("help", "max_batch_size")
                           for f in a.option_strings)
    return _CLI_FLAGS, _CLI_BOOLS


def _cli_value(rnd: random.Random, flag: str) -> str:
    name = flag[2:].replace("-", "_")
    if rnd.random() < 0.6:
        v = {"gpu": rnd.choice(("h100-80gb", "rtx-4090", "a100-40gb")),
             "gpu_memory": rnd.choice(("24GiB", "80GB", "16GiB"))}.get(name, _valid_value(rnd, name))
        if v is not None:
            return str(v)
    return rnd.choice(("0", "-1", "1e300", "99999999999999999999", "abc", "", " ", "2", "nan", "all-linear",
                       "x" * 300, "80", "1KiB"))


def cli_argv(rnd: random.Random) -> list[str]:
    """An argv for ``memfit.cli.main``: estimate (mostly), models, or a job/engine file."""
    k = rnd.random()
    if k < 0.05:
        return rnd.choice((["models", "--json"], [], ["estimate"], ["nosuchcommand"], ["--version"]))
    flags, bools = _cli_flags()
    argv = ["estimate", str(_model_ref(rnd)) if rnd.random() < 0.3 else rnd.choice(_SMALL_MODELS)]
    for flag in rnd.sample(flags, rnd.randint(0, 5)):
        argv += [flag, _cli_value(rnd, flag)]
    for flag in rnd.sample(bools, rnd.randint(0, 2)):
        argv.append(flag)
    r = rnd.random()
    if r < 0.15:
        ext, data = _job_file_text(rnd)
        p = tmpdir() / f"cli-job-{rnd.randrange(10**9)}{ext}"
        p.write_bytes(data)
        argv += ["--job", str(p)]
    elif r < 0.25:
        kind = rnd.choice(("--deepspeed", "--accelerate-config"))
        cfg = _ds_config(rnd) if kind == "--deepspeed" else _accel_config(rnd)
        p = tmpdir() / f"cli-eng-{rnd.randrange(10**9)}.json"
        p.write_text(_json_dump(cfg))
        argv += [kind, str(p)]
    elif r < 0.3:
        argv += ["--max-batch-size", "--gpu-memory", rnd.choice(("80GiB", "24GB", "1", "0GiB", "abc", "1e300GiB"))]
    return argv


def _call_cli(rnd: random.Random) -> Callable[[], Any]:
    argv = cli_argv(rnd)

    def run():
        return run_cli(argv)
    run.input = argv  # type: ignore[attr-defined]
    return run


#: surface name -> (generator, share of the inputs)
SURFACES: dict[str, tuple[Callable[[random.Random], Callable[[], Any]], float]] = {
    "job": (_call_job, 0.25),
    "estimate": (_call_estimate, 0.2),
    "max_batch_size": (_call_max_batch, 0.03),
    "load_model": (_call_load_model, 0.1),
    "config": (_call_config, 0.2),
    "job_file": (_call_job_file, 0.07),
    "engine_config": (_call_engine_config, 0.1),
    "cli": (_call_cli, 0.05),
}


def cli_output_ok(result: Any) -> str | None:
    """For a CLI outcome: None when it is clean, else what is wrong. Clean: no traceback anywhere; exit 0;
    exit 1 with an answer on stdout ("does not fit"); any other exit with exactly one line on stderr, memfit's
    (argparse's usage errors too: one line, not the usage block)."""
    _, code, out, err = result
    if "Traceback" in err or "Traceback" in out:
        return "traceback in output"
    if code == 0 or (code == 1 and out.strip()):
        return None
    return one_line_error(result)


if __name__ == "__main__":  # pragma: no cover - a quick look at a few inputs
    r = random.Random(0)
    for s, (gen, _) in SURFACES.items():
        print(s, gen(r).input)  # type: ignore[attr-defined]
