"""Configs as transformers reads and writes them (transformers 5.17): what ``AutoConfig`` accepts for a
supported ``model_type``, memfit accepts, counting the same parameters.

transformers normalises configs when it loads them and writes the normalised form back (``to_dict``):
sliding windows switched off become ``"sliding_window": 0`` with ``use_sliding_window: false`` (Qwen2-MoE),
``head_dim`` may be null, defaults fill every key. Exact: the parameter counts must be equal.
"""

from __future__ import annotations

import warnings

import pytest

from memfit.models import SUPPORTED_MODEL_TYPES, load_model, registry_names, spec_from_config
from memfit.models import _read_json, _REGISTRY_DIR  # noqa: PLC2701 - the registry's raw files

transformers = pytest.importorskip("transformers")


def _round_trip(raw: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rest = {k: v for k, v in raw.items() if k != "model_type"}
        return transformers.AutoConfig.for_model(raw["model_type"], **rest).to_dict()


@pytest.mark.parametrize("name", registry_names())
def test_registry_entry_after_transformers_round_trip(name):
    """Every registry config, read by AutoConfig and written back by to_dict, counts the same parameters
    (before the fix Qwen1.5-MoE-A2.7B's written form, sliding_window 0, was refused)."""
    spec = spec_from_config(_round_trip(_read_json(_REGISTRY_DIR / f"{name}.json")), name=name)
    assert spec.parameters == load_model(name).parameters


@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_MODEL_TYPES])
def test_transformers_default_config_is_accepted(model_type):
    """``AutoConfig.for_model(model_type)`` with no keys at all: transformers' defaults are a valid model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(model_type).to_dict()
    assert spec_from_config(cfg, name=model_type).parameters > 0


def test_sliding_window_zero_means_off():
    raw = _read_json(_REGISTRY_DIR / "qwen1.5-moe-a2.7b.json")
    off = spec_from_config({**raw, "sliding_window": 0, "use_sliding_window": False}, name="q")
    assert all(b.attention.sliding_window is None for b in off.blocks)
    assert off.parameters == load_model("qwen1.5-moe-a2.7b").parameters


def test_head_dim_null_falls_back_to_hidden_over_heads():
    raw = _read_json(_REGISTRY_DIR / "llama-3.2-1b.json")
    spec = spec_from_config({**raw, "head_dim": None}, name="l")
    assert spec.blocks[0].attention.head_dim == raw["hidden_size"] // raw["num_attention_heads"]
