"""Vision towers and projectors of multimodal checkpoints: what a serving engine loads next to the text model.

A :class:`~memfit.models.ModelSpec` of a multimodal checkpoint (Gemma 3, Mistral 3 / Pixtral, LLaVA)
describes its text model; the top-level config, less ``text_config``, is kept in ``spec.multimodal``. vLLM
and SGLang load the whole ``*ForConditionalGeneration`` (the vision encoder and the projector too), so
their weights are larger than the text model's. This module counts those parameters from the config's
``vision_config``, exactly as ``transformers`` 5.x builds them (``tests/test_served_models.py`` compares
with the real classes on the meta device):

- ``siglip_vision_model`` (``modeling_siglip.py``): patch conv with bias, a learned position embedding of
  ``(image_size / patch_size)**2`` rows, per layer two LayerNorms (weight and bias), q/k/v/out and fc1/fc2
  with biases, a final LayerNorm, and the attention-pooling head only when ``vision_use_head``;
- ``pixtral`` (``modeling_pixtral.py``): patch conv without bias, ``ln_pre`` RMSNorm, per layer two
  RMSNorms, q/k/v/o and a gated MLP (gate/up/down), all without bias;
- ``clip_vision_model`` (``modeling_clip.py``): class embedding, patch conv without bias, position
  embedding of ``patches + 1`` rows, ``pre_layrnorm`` and ``post_layernorm``, layers as SigLIP's;
- ``llama4_vision_model`` (``modeling_llama4.py``): an unfold + linear patch embedding without bias, class and
  position embeddings (``patches + 1``), LayerNorms before and after, layers as SigLIP's, and the pixel-shuffle
  adapter (``fc1``: intermediate -> projector_input_dim, ``fc2``: projector_output_dim squared, no biases);

and the projectors: Gemma 3 (``modeling_gemma3.py``: ``mm_input_projection_weight`` vision x text and
``mm_soft_emb_norm``), Mistral 3 (``modeling_mistral3.py``: RMSNorm, ``patch_merger.merging_layer``
of ``vision x merge**2 -> vision``, ``linear_1`` / ``linear_2`` with ``multimodal_projector_bias``) and
LLaVA (``modeling_llava.py``: two linears with ``multimodal_projector_bias``, default on) and Llama 4
(``linear_1``: vision_output_dim -> text hidden, no bias).

Per tensor-parallel rank the engines shard the encoder's linears and the Mistral 3 / LLaVA projector
linears (vLLM ``models/siglip.py``, ``models/pixtral.py``, ``models/llava.py``, ``models/mistral3.py``:
``QKVParallelLinear``, ``ColumnParallelLinear``, ``RowParallelLinear``; SGLang's ports do the same) and
keep the embeddings, norms, merging layer and Gemma 3's projection weight whole. The tower stays 16-bit in
quantized checkpoints (their ``ignore`` lists name it). Pure data, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["VisionTower", "vision_tower", "VISION_MODEL_TYPES"]

VISION_MODEL_TYPES = ("siglip_vision_model", "pixtral", "clip_vision_model", "llama4_vision_model")


@dataclass(frozen=True, slots=True)
class VisionTower:
    """The parameters of a multimodal checkpoint outside its text model."""

    kind: str
    """The ``vision_config`` model_type and the projector, e.g. ``siglip_vision_model + gemma3``."""
    sharded_params: int
    """Parameters of linears the engines split over tensor-parallel ranks (their weights; biases of
    column-parallel linears split with them, row-parallel biases are in ``replicated_params``)."""
    replicated_params: int
    """Embeddings, norms, convolutions and unsharded projections: every rank holds them whole."""

    @property
    def params(self) -> int:
        return self.sharded_params + self.replicated_params

    def params_on_rank(self, tp: int) -> int:
        """Parameters one of ``tp`` tensor-parallel ranks holds."""
        return math.ceil(self.sharded_params / tp) + self.replicated_params


def _int(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"config.json: vision_config.{key} must be a whole number, got {v!r}")
    return v


def _siglip_like(v: dict[str, Any], *, defaults: dict[str, int], clip: bool) -> tuple[int, int]:
    H = _int(v, "hidden_size", defaults["hidden_size"])
    inter = _int(v, "intermediate_size", defaults["intermediate_size"])
    layers = _int(v, "num_hidden_layers", defaults["num_hidden_layers"])
    chans = _int(v, "num_channels", 3)
    patch = _int(v, "patch_size", defaults["patch_size"])
    image = _int(v, "image_size", defaults["image_size"])
    patches = (image // patch) ** 2
    sharded = layers * (4 * H * H + 3 * H + 2 * H * inter + inter)  # q/k/v/out + fc1 weights, their column biases
    replicated = layers * (H + H + 2 * 2 * H)  # out_proj and fc2 biases (row-parallel), two LayerNorms
    if clip:
        replicated += H + chans * patch * patch * H + (patches + 1) * H + 2 * H + 2 * H  # class, conv, pos, pre, post
    else:
        replicated += chans * patch * patch * H + H + patches * H + 2 * H  # conv with bias, pos, post_layernorm
        if v.get("vision_use_head", True):
            # SiglipMultiheadAttentionPoolingHead: probe, nn.MultiheadAttention (in_proj 3H x H + bias, out_proj),
            # LayerNorm, MLP
            replicated += H + 3 * H * H + 3 * H + H * H + H + 2 * H + 2 * H * inter + inter + H
    return sharded, replicated


def _pixtral(v: dict[str, Any]) -> tuple[int, int]:
    # PixtralVisionConfig defaults (configuration_pixtral.py)
    H = _int(v, "hidden_size", 1024)
    inter = _int(v, "intermediate_size", 4096)
    layers = _int(v, "num_hidden_layers", 24)
    chans = _int(v, "num_channels", 3)
    patch = _int(v, "patch_size", 16)
    heads = _int(v, "num_attention_heads", 16)
    head_dim = _int(v, "head_dim", H // heads if heads else 64)
    attn = 3 * heads * head_dim * H + H * heads * head_dim
    sharded = layers * (attn + 3 * H * inter)
    replicated = chans * patch * patch * H + H + layers * 2 * H  # patch_conv, ln_pre, two RMSNorms per layer
    return sharded, replicated


def _llama4(v: dict[str, Any]) -> tuple[int, int]:
    # Llama4VisionConfig defaults (configuration_llama4.py)
    H = _int(v, "hidden_size", 768)
    inter = _int(v, "intermediate_size", 5632)
    layers = _int(v, "num_hidden_layers", 34)
    chans = _int(v, "num_channels", 3)
    patch = _int(v, "patch_size", 14)
    image = _int(v, "image_size", 448)
    p_in = _int(v, "projector_input_dim", 4096)
    p_out = _int(v, "projector_output_dim", 4096)
    sharded = layers * (4 * H * H + 3 * H + 2 * H * inter + inter) + inter * p_in + p_out * p_out
    replicated = layers * (H + H + 2 * 2 * H)  # o_proj and fc2 biases, two LayerNorms
    replicated += chans * patch * patch * H + H + ((image // patch) ** 2 + 1) * H + 2 * H + 2 * H
    return sharded, replicated


def vision_tower(multimodal: dict[str, Any], text_hidden: int, *, strict: bool = True) -> VisionTower | None:
    """The vision encoder and projector of a multimodal config (``spec.multimodal``), or None when the
    config has no ``vision_config``. A vision model or projector memfit does not count raises
    :class:`ConfigError`, or gives None with ``strict=False``; malformed sizes always raise."""
    if not multimodal:
        return None
    v = multimodal.get("vision_config")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ConfigError("config.json: vision_config must be an object")
    top = str(multimodal.get("model_type", ""))
    vtype = str(v.get("model_type") or {"gemma3": "siglip_vision_model", "mistral3": "pixtral",
                                        "llava": "clip_vision_model"}.get(top, ""))
    if vtype == "siglip_vision_model":
        sharded, replicated = _siglip_like(v, clip=False, defaults={
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "patch_size": 16, "image_size": 224})
    elif vtype == "clip_vision_model":
        sharded, replicated = _siglip_like(v, clip=True, defaults={
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "patch_size": 32, "image_size": 224})
    elif vtype == "pixtral":
        sharded, replicated = _pixtral(v)
    elif vtype == "llama4_vision_model":
        sharded, replicated = _llama4(v)
    elif not strict:
        return None
    else:
        raise ConfigError(f"config.json: vision_config model_type {vtype!r} is not counted by memfit "
                          f"(it counts {', '.join(VISION_MODEL_TYPES)})")
    Hv = _int(v, "hidden_size", {"pixtral": 1024}.get(vtype, 768))
    Ht = text_hidden
    if top == "llama4":
        replicated += _int(v, "vision_output_dim", 7680) * Ht  # multi_modal_projector.linear_1, no bias
    elif top == "gemma3":
        replicated += Hv * Ht + Hv  # mm_input_projection_weight, mm_soft_emb_norm
    elif top == "mistral3":
        merge = _int(multimodal, "spatial_merge_size", 2)
        bias = bool(multimodal.get("multimodal_projector_bias", False))
        layers = len(multimodal.get("vision_feature_layer")) if isinstance(multimodal.get("vision_feature_layer"), list) else 1
        Hin = Hv * layers
        replicated += Hin + Hin * merge * merge * Hin  # norm, patch_merger.merging_layer
        sharded += Hin * Ht + Ht * Ht + (Ht if bias else 0)
        replicated += Ht if bias else 0
    elif top == "llava":
        bias = bool(multimodal.get("multimodal_projector_bias", True))
        layers = len(multimodal.get("vision_feature_layer")) if isinstance(multimodal.get("vision_feature_layer"), list) else 1
        sharded += Hv * layers * Ht + Ht * Ht + (Ht if bias else 0)
        replicated += Ht if bias else 0
    elif not strict:
        return None
    else:
        raise ConfigError(f"config.json: the projector of model_type {top!r} is not counted by memfit "
                          "(it counts gemma3, mistral3, llava and llama4)")
    return VisionTower(f"{vtype} + {top}", sharded, replicated)
