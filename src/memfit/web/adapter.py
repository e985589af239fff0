"""The one place the web views call the library: estimate, verdict, plan, models and GPUs.

Every function takes and returns plain JSON-able data. A request's model reference is checked here
(:func:`resolve_model`): a registry name, a pasted ``config.json``, a path under the server's root, or a
Hub id only when the server was started with ``--allow-hub``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobError, MemfitError, ModelNotFoundError

PASTED = "pasted-config"
"""The job's ``model`` when the request carries its own ``config.json``."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What a request may make the server read."""

    root: Path | None = None
    """Config paths in requests must resolve inside this folder; None: no paths at all."""
    allow_hub: bool = False
    """Whether a Hub id may be fetched (needs the network)."""


def _is_registry_name(ref: str) -> bool:
    from ..models import _aliases

    return ref.strip().lower() in _aliases()


def resolve_model(ref: str, config: dict[str, Any] | None, policy: Policy):
    """The :class:`~memfit.models.ModelSpec` for a request, or None to let the estimator look up ``ref``
    itself (a registry name). Raises a one-line :class:`MemfitError` for anything the policy forbids."""
    from ..models import load_model
    from ..models.families import spec_from_config

    if config is not None:
        if not isinstance(config, dict):
            raise JobError("config must be the JSON object of a model's config.json")
        return spec_from_config(config, name=PASTED, source="pasted config.json")
    if not isinstance(ref, str) or not ref.strip():
        raise JobError("a job needs a model: a registry name (see /api/models) or a pasted config.json")
    if _is_registry_name(ref):
        return None
    looks_like_path = ref.endswith(".json") or ref.startswith((".", "/", "~")) or "\\" in ref
    if policy.root is not None and (looks_like_path or not policy.allow_hub):
        root = policy.root.resolve()
        path = (root / Path(ref).expanduser()).resolve()
        if path.is_relative_to(root) and path.exists():
            return load_model(str(path))
        if looks_like_path:
            raise ModelNotFoundError(f"config path {ref!r} is not a file under the server's root {str(root)!r}")
    elif looks_like_path:
        raise ModelNotFoundError(f"config path {ref!r}: this server reads no files (start it with --root DIR)")
    if not policy.allow_hub:
        raise ModelNotFoundError(f"unknown model {ref!r}: not a built-in name; Hub ids need `memfit web --allow-hub`, "
                                 "or paste the config.json")
    if Path(ref).expanduser().exists():  # load_model would read this local path: not one the policy allows
        raise ModelNotFoundError(f"config path {ref!r} is not a file under the server's root")
    return load_model(ref)


def card_bytes(gpu: str | None, gpu_memory: str | int | None) -> int | None:
    """The card's memory in bytes from a catalog name or a size (24GiB / 16GB / bytes), like the CLI's
    ``--gpu`` / ``--gpu-memory``."""
    if gpu and gpu_memory not in (None, ""):
        raise JobError("give gpu or gpu_memory, not both")
    if gpu:
        from ..gpus import get_gpu

        return get_gpu(gpu).memory_bytes
    if gpu_memory not in (None, ""):
        from ..units import parse_card_memory

        return parse_card_memory(gpu_memory if isinstance(gpu_memory, int) else str(gpu_memory), flag="gpu_memory")
    return None


def _job(job: dict[str, Any], config, policy: Policy):
    from ..job import Job

    if not isinstance(job, dict):
        raise JobError("job must be a JSON object of job fields (see README, 'Jobs')")
    data = dict(job)
    if config is not None:
        data["model"] = PASTED
    spec = resolve_model(data.get("model", ""), config, policy)
    if spec is not None:  # the lengths a job leaves out follow the model resolved here (a pasted config, a path)
        from ..job import default_lengths
        from ..models import spec_position_limit

        found = spec_position_limit(spec)
        data = default_lengths(data, found[0] if found else None)
    return Job.from_dict(data), spec


def estimate(job: dict[str, Any], *, gpu=None, gpu_memory=None, config=None, policy: Policy = Policy()) -> dict:
    """What ``memfit estimate --json`` prints for this job (and card), as a dict."""
    from ..commands.estimate import estimate_with_verdict

    j, spec = _job(job, config, policy)
    bd, _ = estimate_with_verdict(j, card_bytes(gpu, gpu_memory), spec)
    return json.loads(bd.to_json())


def plan_available() -> bool:
    """Whether this install has :func:`memfit.plan`."""
    try:
        from ..plan import plan  # noqa: F401
    except ImportError:
        return False
    return True


def plan(job: dict[str, Any], *, gpu=None, gpu_memory=None, config=None, top: int = 10,
         min_headroom_percent: float = 3.0, policy: Policy = Policy()) -> dict:
    """What ``memfit plan --json`` prints: candidates that fit the card, fastest first."""
    from ..plan import plan as _plan

    j, spec = _job(job, config, policy)
    mem = card_bytes(gpu, gpu_memory)
    if mem is None:
        raise JobError("plan needs a card: gpu (a name from /api/gpus) or gpu_memory (24GiB)")
    if not 1 <= top <= 100:
        raise JobError("top must be between 1 and 100")
    if not 0 <= min_headroom_percent < 100:
        raise JobError("min_headroom_percent must be in [0, 100)")
    res = _plan(j, gpu or None, gpu_memory_bytes=None if gpu else mem, top=top, spec=spec,
                min_headroom=min_headroom_percent / 100)
    return res.to_dict()


def serve(model: str, *, engine: str = "vllm", gpu=None, gpu_memory=None, config=None, flags=None,
          policy: Policy = Policy()) -> dict:
    """What ``memfit serve --json`` prints: the KV cache vLLM or SGLang will allocate for ``model`` on the card."""
    from ..serve import serve as _serve

    spec = resolve_model(PASTED if config is not None else model, config, policy)
    mem = card_bytes(gpu, gpu_memory)
    if mem is None:
        raise JobError("serve needs a card: gpu (a name from /api/gpus) or gpu_memory (80GiB)")
    if flags is not None and not isinstance(flags, dict):
        raise JobError("flags must be a JSON object of the engine's flags (tensor_parallel, max_model_len, ...)")
    return _serve(spec if spec is not None else model, engine=engine, gpu=gpu or None, gpu_memory=None if gpu else mem,
                  **dict(flags or {})).to_dict()


def models() -> list[dict[str, Any]]:
    """What ``memfit models --json`` prints."""
    from ..models import list_models

    return list_models()


def gpus() -> list[dict[str, Any]]:
    """The GPU catalog: name, title, vendor, memory_bytes, aliases."""
    from ..gpus import all_gpus

    return [{"name": g.name, "title": g.title, "vendor": g.vendor, "memory_bytes": g.memory_bytes,
             "aliases": list(g.aliases)} for g in all_gpus()]


def warm_up() -> None:
    """Load the registry index, the GPU catalog and the estimator once, so a server's first request does not
    pay for the imports (the page's first load is measured in tests/test_web_browser.py)."""
    models()
    gpus()
    estimate({"model": "gpt2"})


def job_fields() -> list[dict[str, Any]]:
    """Each job field: name, type and default (the form's defaults come from the library)."""
    from dataclasses import MISSING, fields

    from ..job import Job

    out = []
    for f in fields(Job):
        default = None if f.default is MISSING else f.default
        out.append({"name": f.name, "type": str(f.type), "default": default})
    return out


__all__ = ["Policy", "MemfitError", "estimate", "plan", "plan_available", "models", "gpus", "job_fields",
           "resolve_model", "card_bytes"]
