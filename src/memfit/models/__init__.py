"""Models: what memfit knows of a model's shape, built from its Hugging Face ``config.json``.

- :func:`load_model` resolves a registry name, a local ``config.json`` (or a folder holding one) or a
  Hub id to a :class:`ModelSpec`;
- :func:`list_models` lists the built-in registry;
- :func:`spec_from_config` parses a config dict directly.

The registry is data: ``registry/<name>.json`` are public ``config.json`` files, ``registry/index.json``
says where each came from, and ``registry/aliases.json`` maps served Hub ids (instruct and chat releases,
mirrors, AWQ/GPTQ/FP8 repackagings) that share a registry entry's architecture to that entry, with the
model card each came from, the checkpoint's quantization and any non-size config keys that differ. Hub ids
resolve offline from these files before any Hub lookup. Nothing is read until asked for, and no torch is
imported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import lru_cache

from ..errors import ConfigError, ModelNotFoundError, brief
from .families import SUPPORTED_MODEL_TYPES, spec_from_config
from .spec import MLP, Attention, Block, Linear, ModelSpec, MoE

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any
    from pathlib import Path

__all__ = [
    "ModelSpec", "Block", "Attention", "MLP", "MoE", "Linear",
    "load_model", "list_models", "spec_from_config", "registry_names", "hub_alias", "hub_aliases",
    "SUPPORTED_MODEL_TYPES", "LEARNED_POSITIONS", "position_limit", "spec_position_limit",
]

#: Families whose position embeddings are a learned table (GPT-2 ``wpe``, OPT ``embed_positions``,
#: BERT/RoBERTa/DistilBERT ``position_embeddings``): a longer sequence indexes past the table and the run
#: fails. Rotary (and ALiBi) families have no table: past ``max_position_embeddings`` they only extrapolate.
LEARNED_POSITIONS = ("gpt2", "opt", "bert", "roberta", "distilbert")

#: the registry's folder, a str (os.path): a start-up that reads built-in models does without pathlib;
#: ``_REGISTRY_DIR`` is the same folder as a Path (made on first use, :func:`__getattr__`)
_REGISTRY = os.path.join(os.path.dirname(__file__), "registry")


def __getattr__(name: str):
    if name == "_REGISTRY_DIR":
        from pathlib import Path

        return Path(_REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry_file(name: str) -> str:
    return os.path.join(_REGISTRY, name + ".json")
_HUB_URL = "https://huggingface.co/{}"


@lru_cache(maxsize=1)
def _index() -> dict[str, dict[str, str]]:
    """``registry/index.json``: {name: {hf_id, source, note, aliases (optional)}}."""
    with open(_registry_file("index"), encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def _hub_alias_table() -> dict[str, dict[str, Any]]:
    """``registry/aliases.json``: {hub id: {model, source, quantization?, overrides?, multimodal?, note?}}."""
    with open(_registry_file("aliases"), encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def _hub_alias_lower() -> dict[str, str]:
    return {hub.lower(): hub for hub in _hub_alias_table()}


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Lower-cased registry names, Hub ids, listed aliases and served Hub ids (``aliases.json``), each
    mapped to its registry name."""
    aliases = {name.lower(): name for name in _index()}
    for name, entry in _index().items():
        for alias in (entry.get("hf_id", ""), *entry.get("aliases", ())):
            if alias:
                aliases.setdefault(alias.lower(), name)
    for hub, entry in _hub_alias_table().items():
        aliases.setdefault(hub.lower(), entry["model"])
    return aliases


def hub_aliases() -> dict[str, dict[str, Any]]:
    """The served Hub ids memfit resolves offline to a registry entry (``registry/aliases.json``), each
    with ``model`` (the registry name), ``source`` (its model card), and where they apply
    ``quantization`` (how that checkpoint stores its weights: awq, gptq, gptq-int8, fp8, nf4, mxfp4),
    ``overrides`` (config keys that differ from the entry's without changing any size), ``multimodal`` (the
    top-level keys of a multimodal checkpoint whose text model is the entry: its ``vision_config`` and
    projector settings, see :mod:`memfit.models.vision`) and ``note``."""
    return {hub: dict(entry) for hub, entry in _hub_alias_table().items()}


def hub_alias(ref: str) -> dict[str, Any] | None:
    """The ``aliases.json`` entry of Hub id ``ref`` (case-insensitive), with its ``hub_id`` spelled as
    listed; None when ``ref`` is not a listed served id."""
    hub = _hub_alias_lower().get(ref.strip().lower())
    if hub is None:
        return None
    return {"hub_id": hub, **_hub_alias_table()[hub]}


@lru_cache(maxsize=1)
def _registry_keys() -> frozenset[str]:
    """Lower-cased names, Hub ids and listed aliases of the registry entries themselves (index.json)."""
    keys = set()
    for name, entry in _index().items():
        keys.update(k.lower() for k in (name, entry.get("hf_id", ""), *entry.get("aliases", ())) if k)
    return frozenset(keys)


def registry_names() -> list[str]:
    """Names of the built-in models, in index order."""
    return list(_index())


def _read_json(path: str | Path) -> dict[str, Any]:
    """A config.json as a dict; every way it can be unreadable is a one-line ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); is it a config.json?"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; point memfit at a model's config.json") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deep to be a config.json") from None
    except ValueError as exc:  # integers of more than 4300 digits (sys.get_int_max_str_digits)
        raise ConfigError(f"{path} holds a number memfit cannot read ({str(exc).split(':')[0]})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _hub_reachable() -> bool:
    """Whether the Hub's host resolves at all (offline machines fail fast instead of retrying)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _looks_like_hub_id(ref: str) -> bool:
    """``owner/name``: one slash, no path syntax (the shape ``huggingface_hub`` accepts as a repo id)."""
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~")) and " " not in ref


def _from_hub(ref: str) -> Path | None:
    """Download (or reuse from the hub cache) ``config.json`` of a Hub repo.

    None when ``ref`` is not shaped like a Hub id; a one-line :class:`ModelNotFoundError` (or
    :class:`MissingDependencyError`) that says *which* way it failed when it is: huggingface_hub missing,
    the machine offline, the repo gated, no such repo, no config.json in it."""
    if not _looks_like_hub_id(ref):
        return None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f"{ref!r} looks like a Hugging Face Hub id, and reading it needs huggingface_hub: "
                                     "pip install 'memfit[hub]' (or point memfit at a local config.json)") from None
    from pathlib import Path

    hub_logging.set_verbosity_error()
    try:  # the cache answers offline too
        return Path(hf_hub_download(repo_id=ref, filename="config.json", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(f"{ref!r} is not a built-in name and not in the Hub cache, and the Hub is not "
                                 "reachable (offline, or HF_HUB_OFFLINE is set); download its config.json and "
                                 "pass the path")
    try:
        return Path(hf_hub_download(repo_id=ref, filename="config.json"))
    except Exception as exc:  # noqa: BLE001 - sorted by kind below
        kind = type(exc).__name__
        if kind == "GatedRepoError":
            why = ("is gated: accept its license on huggingface.co, then log in (huggingface-cli login or "
                   "HF_TOKEN), or pass a local config.json")
        elif kind in ("RepositoryNotFoundError", "HFValidationError"):
            why = "is not a Hub repo (or it is private: log in with huggingface-cli login or HF_TOKEN)"
        elif kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            why = "is a Hub repo without a config.json (not a transformers model?)"
        else:
            why = f"could not be fetched from the Hub ({kind}); check the network or pass a local config.json"
        raise ModelNotFoundError(f"{ref!r} {why}") from None


def _not_found(ref: str) -> ModelNotFoundError:
    import difflib  # only for an unknown name: not on every start

    close = difflib.get_close_matches(ref.lower(), list(_aliases()), n=3, cutoff=0.5) if len(ref) < 200 else []
    names = list(dict.fromkeys(_aliases()[c] for c in close))
    hint = f"; close built-in names: {', '.join(names)}" if names else "; run `memfit models` to list built-in names"
    return ModelNotFoundError(
        f"unknown model {brief(ref, 100)}: not a built-in name, a local config.json, or a reachable Hub id{hint}"
    )


def load_model(ref: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` of ``ref``: a registry name (case-insensitive; a registry entry's Hub id
    and listed aliases also resolve to it, and so do the served Hub ids of ``aliases.json``, offline,
    with their config overrides applied and their checkpoint quantization recorded), a path to a
    ``config.json`` or to a folder holding one,
    else a Hugging Face Hub id whose ``config.json`` is fetched with ``huggingface_hub`` (and cached by it).

    Raises :class:`~memfit.errors.ModelNotFoundError` when none of these resolves, and
    :class:`~memfit.errors.ConfigError` when the config cannot be counted.
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise ModelNotFoundError(f"a model is named by a string (registry name, config.json path or Hub id), "
                                 f"not {type(ref).__name__} {brief(ref)}")
    return _load_model(ref)


def _local_config(key: str) -> Path | None:
    """The config.json a local path names (a file, or a folder holding one), or None when the path does
    not exist. Names the OS refuses (too long, a NUL byte, ``~user`` of no such user) are not paths."""
    from pathlib import Path  # here: a built-in name never reaches this

    try:
        path = Path(key).expanduser()
    except RuntimeError:  # ~nosuchuser: expanduser cannot resolve the home folder
        path = Path(key)
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"folder {brief(key, 200)} has no config.json; point memfit at a model "
                                         "folder or file")
            return path / "config.json"
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=256)
def _load_model(ref: str) -> ModelSpec:
    key = ref.strip()
    name = _aliases().get(key.lower())
    if name is not None:
        config = _read_json(_registry_file(name))
        alias = hub_alias(key) if key.lower() not in _registry_keys() else None
        if alias is None:
            return spec_from_config(config, name=name, source=_index()[name].get("source", ""))
        overrides = alias.get("overrides") or {}
        if "text_config" in config and overrides:
            config = dict(config, text_config=dict(config["text_config"], **overrides))
        else:
            config = dict(config, **overrides)
        spec = spec_from_config(config, name=name, source=alias["source"])
        return replace(spec, checkpoint_quantization=alias.get("quantization", spec.checkpoint_quantization),
                       multimodal=alias.get("multimodal", spec.multimodal))

    path = _local_config(key)
    if path is not None:
        return spec_from_config(_read_json(path), name=key, source=str(path.resolve()))

    downloaded = _from_hub(key) if key else None
    if downloaded is None:
        raise _not_found(key)
    return spec_from_config(_read_json(downloaded), name=key, source=_HUB_URL.format(key))


load_model.cache_clear = _load_model.cache_clear  # type: ignore[attr-defined]


def spec_position_limit(spec: ModelSpec) -> tuple[int, bool] | None:
    """(longest sequence ``spec``'s positions take, whether they are a learned table), or None when the config
    names no limit.

    The learned tables, transformers 5.17: GPT-2 ``wpe`` has ``n_positions`` rows; BERT and DistilBERT
    ``position_embeddings`` ``max_position_embeddings`` rows from position 0; OPT's
    ``OPTLearnedPositionalEmbedding`` adds its offset of 2 to ``max_position_embeddings`` rows, so
    ``max_position_embeddings`` tokens fit; RoBERTa numbers positions from ``padding_idx + 1``
    (``create_position_ids_from_input_ids``), so ``max_position_embeddings - pad_token_id - 1`` tokens fit (512 of
    roberta-base's 514 rows). Other families: ``max_position_embeddings`` as the config says (not a hard limit)."""
    n = int(spec.max_position_embeddings or 0)
    if n <= 0:
        return None
    learned = spec.model_type in LEARNED_POSITIONS
    if spec.model_type == "roberta":
        pad = spec.config.get("pad_token_id", 1) if isinstance(spec.config, dict) else 1
        pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < n else 1
        n -= pad + 1
    return (n, learned) if n > 0 else None


@lru_cache(maxsize=256)
def position_limit(ref: str) -> tuple[int, bool] | None:
    """:func:`spec_position_limit` of a registry entry, a local config.json or a Hub id already in the Hub
    cache, without the network; None when ``ref`` is none of these or its config cannot be read. Never raises
    (a default, not a check: the engines report a bad model themselves)."""
    try:
        key = ref.strip()
        if _aliases().get(key.lower()) is not None or _local_config(key) is not None:
            return spec_position_limit(load_model(key))
        if "/" not in key or key.count("/") != 1:
            return None
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            return None
        path = hf_hub_download(repo_id=key, filename="config.json", local_files_only=True)
        return spec_position_limit(spec_from_config(_read_json(path), name=key))
    except Exception:  # noqa: BLE001 - see above
        return None


@lru_cache(maxsize=256)
def checkpoint_dtype(ref: str) -> str | None:
    """The ``torch_dtype`` (or ``dtype``) a registry entry's or a local config.json names, without building
    a spec and without the network: ``float32`` when the config names none (transformers' default), None
    when ``ref`` is neither a registry name nor a readable local config. Never raises."""
    try:
        key = ref.strip()
        name = _aliases().get(key.lower())
        path = _registry_file(name) if name is not None else _local_config(key)
        if path is None:
            return None
        config = _read_json(path)
        if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], **{k: config[k] for k in ("torch_dtype", "dtype") if k in config}}
        if not isinstance(config, dict):
            return None
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        return dtype if isinstance(dtype, str) else None
    except Exception:  # noqa: BLE001 - a default, not a check: the engines report a bad config themselves
        return None


def list_models() -> list[dict[str, Any]]:
    """The built-in models: name, model_type, architecture, parameters, hf_id and source, one dict each,
    sorted by family then size."""
    rows = []
    for name, entry in _index().items():
        spec = load_model(name)
        rows.append({
            "name": name,
            "model_type": spec.model_type,
            "architecture": spec.architecture,
            "parameters": spec.parameters,
            "hf_id": entry.get("hf_id", ""),
            "source": entry.get("source", ""),
        })
    rows.sort(key=lambda r: (r["model_type"], r["parameters"], r["name"]))
    return rows
