"""ModelSpec: what memfit needs to know of a model, normalized from its Hugging Face ``config.json``.

A spec is torch-free data. It lists every parameter of the model in groups that the estimator can
reason about: embeddings, a few kinds of decoder/encoder blocks (each with a count), the final norm and
the head. Inside a block, every ``nn.Linear`` appears as a :class:`Linear` with the module name PEFT
matches (``q_proj``, ``c_attn``, ``query_key_value`` ...), so LoRA targets and quantized layers can be
counted; norms and other small tensors go into ``other_params``. The total is exact: a test builds every
registry entry with ``transformers`` on the meta device and compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Linear", "Attention", "MLP", "MoE", "Block", "ModelSpec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Linear:
    """One kind of linear layer in a block (``count`` instances of it per layer)."""

    name: str
    """Leaf module name as PEFT's ``target_modules`` matches it (``q_proj``, ``dense_h_to_4h`` ...)."""
    in_features: int
    out_features: int
    bias: bool
    count: int = 1
    """Instances per layer (the routed experts of an MoE layer)."""
    role: str = ""
    """What it does: q, k, v, qkv, o, gate, up, gate_up, down, router, q_a, q_b, kv_a, kv_b,
    expert_gate, expert_up, expert_gate_up, expert_down, shared_gate, shared_up, shared_down, shared_router."""
    is_module: bool = True
    """False for fused weights that are plain ``nn.Parameter`` tensors (transformers 5's fused MoE
    experts); PEFT's ``all-linear`` does not wrap those and bitsandbytes does not quantize them."""
    fp32: bool = False
    """Kept in float32 whatever dtype the model loads in (transformers' ``_keep_in_fp32_modules_strict``:
    the DeepSeek V2/V3 router weights)."""

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def params(self) -> int:
        return (self.in_features * self.out_features + (self.out_features if self.bias else 0)) * self.count


@dataclass(frozen=True, slots=True, kw_only=True)
class Attention:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Query/key head dimension (MLA: nope + rope parts)."""
    v_head_dim: int
    sliding_window: int | None = None
    """Tokens a sliding-window layer attends to (its KV cache is capped there); None for global layers."""
    qk_norm: bool = False
    """RMSNorm over q and k per head (Qwen3, Gemma 3, OLMo 2)."""
    kind: str = "mha"
    """``mha`` (covers GQA and MQA) or ``mla`` (DeepSeek's multi-head latent attention)."""
    kv_lora_rank: int = 0
    """MLA: width of the compressed key/value latent."""
    q_lora_rank: int = 0
    """MLA: width of the compressed query latent (0: plain q projection)."""
    qk_rope_head_dim: int = 0
    """MLA: rotary part of each query/key head."""
    softcap: float | None = None
    """Attention logit soft-capping (Gemma 2)."""
    sinks: bool = False
    """A learned per-head sink logit joins the softmax (gpt-oss ``self_attn.sinks``; transformers 5 runs it
    eagerly or with flash/flex, never sdpa: ``GptOssPreTrainedModel._supports_sdpa = False``)."""
    chunked: bool = False
    """Chunked local attention (Llama 4): ``sliding_window`` holds ``attention_chunk_size``; a token sees its
    own chunk only, and the dynamic cache keeps the layer's last chunk-size tokens like a sliding window
    (transformers 5.17 ``cache_utils.DYNAMIC_LAYER_TYPE_MAPPING["chunked_attention"]``)."""
    rope: bool = True
    """False for NoPE layers (Llama 4's global-attention layers apply no rotary embedding)."""
    rotary_dim: int = 0
    """The rotated part of each head where the rotary embedding is partial (GPT-NeoX ``rotary_pct`` /
    ``partial_rotary_factor``: Pythia rotates a quarter); 0: the whole head (or MLA's ``qk_rope_head_dim``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MLP:
    intermediate_size: int
    gated: bool
    """Three projections (gate, up, down: SwiGLU/GeGLU) instead of two."""
    activation: str = "silu"


@dataclass(frozen=True, slots=True, kw_only=True)
class MoE:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    """Total width of the shared expert MLP (0 if none)."""
    shared_expert_gate: bool = False
    """A sigmoid gate on the shared expert output (Qwen2-MoE)."""
    all_experts: bool = False
    """Every token runs through every routed expert, scaled by a zero score where not chosen (Llama 4 in
    transformers 5.17: ``Llama4TextMoe.forward`` repeats the tokens ``num_experts`` times), so activations
    scale with ``num_experts``, not ``top_k``."""

    @property
    def routed_copies(self) -> int:
        """Copies of each token the routed experts compute on: ``top_k``, or every expert with
        ``all_experts``."""
        return self.num_experts if self.all_experts else self.top_k


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """``count`` identical layers."""

    count: int
    attention: Attention
    mlp: MLP | None
    """Dense MLP; None in MoE layers (their shared experts are described by ``moe``)."""
    moe: MoE | None = None
    norm: str = "rms"
    """``rms`` (weight only), ``layer`` (weight and bias), ``gemma_rms`` (x * (1 + w), computed in fp32),
    ``layer_noaffine`` (LayerNorm without parameters: OLMo 1, OPT with ``layer_norm_elementwise_affine=False``)."""
    norms_per_layer: int = 2
    parallel: bool = False
    """Attention and MLP read the same input and are summed (GPT-J, GPT-NeoX, Falcon, Phi-2)."""
    linears: tuple[Linear, ...] = ()
    other_params: int = 0
    """Parameters of this layer outside ``linears`` (norm weights and biases, ...)."""

    @property
    def layer_params(self) -> int:
        return sum(lin.params for lin in self.linears) + self.other_params

    @property
    def params(self) -> int:
        return self.layer_params * self.count


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    name: str
    """Registry name, Hub id or path the spec was built from."""
    model_type: str
    architecture: str
    """The ``transformers`` class, e.g. ``LlamaForCausalLM``."""
    head: str
    """``causal_lm``, ``masked_lm`` (BERT-style encoders), ``seq_cls`` (sequence classification) or ``base``
    (no head)."""
    hidden_size: int
    vocab_size: int
    num_layers: int
    blocks: tuple[Block, ...]
    embedding_params: int
    """Token embeddings plus position / token-type embeddings and any embedding norm."""
    final_params: int = 0
    """Parameters after the last block (final norm), excluding the head."""
    head_params: int = 0
    """lm_head (0 when tied to the embeddings) or pooler + classifier."""
    tie_word_embeddings: bool = False
    num_labels: int = 2
    max_position_embeddings: int = 0
    final_logit_softcapping: float | None = None
    torch_dtype: str = "float32"
    """dtype named by the config (what ``from_pretrained`` loads by default)."""
    source: str = ""
    """Where the config came from (URL, path)."""
    layer_blocks: tuple[int, ...] = ()
    """For each layer in model order, the index of its entry in ``blocks`` (Gemma 3: five sliding-window
    layers, then one global layer, repeated)."""
    checkpoint_quantization: str = ""
    """How the published checkpoint stores its weights when it is a quantized one (``awq``, ``gptq``,
    ``gptq-int8``, ``fp8``, ``nf4``, ``mxfp4`` ...): from a Hub alias's data or the config's
    ``quantization_config.quant_method``; empty for 16/32-bit checkpoints. It describes the download, not
    the job: the job's ``quantization`` decides what the estimate counts."""
    multimodal: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """For a multimodal checkpoint (Gemma 3, Mistral 3, LLaVA ...): its top-level config less ``text_config``
    (``vision_config`` and the projector's keys), which :mod:`memfit.models.vision` counts; empty otherwise."""
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The raw config.json, for engines that build the real model: ``transformers.AutoConfig.for_model(**config)``
    and the class named by ``architecture``. For a multimodal config (Gemma 3) this is its ``text_config``
    (with the top-level dtype): the spec describes the text model only."""

    _parameters: int = field(init=False, default=0, compare=False, repr=False)
    _hash: int = field(init=False, default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        # what every estimate reads many times, once (the spec is frozen): its parameter count, and its hash (the
        # estimator's per-layer caches are keyed by the spec; hashing its blocks anew each time was slow)
        object.__setattr__(self, "_parameters", self.embedding_params + sum(b.params for b in self.blocks)
                           + self.final_params + self.head_params)
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self) if f.compare)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def parameters(self) -> int:
        """Exact number of parameters (tied embeddings counted once)."""
        return self._parameters

    @property
    def is_encoder(self) -> bool:
        return self.head == "seq_cls" or self.model_type in ("bert", "roberta", "distilbert")

    @property
    def lm_head_params(self) -> int:
        """The vocab projection's parameter count (present even when tied: it reuses the embedding)."""
        return self.vocab_size * self.hidden_size if self.head in ("causal_lm", "masked_lm") else 0
