"""Saved activations of one transformer layer, from a small symbolic replay of its forward.

Each family's layer is written as a short list of ops (norm, linear, rope, attention, activation, add,
mul, dropout, MoE). :func:`saved_bytes_per_token` replays the list with autograd's saving rules
(what each op keeps for backward, in which dtype) and returns the bytes one token leaves behind in
one layer. The rules come from PyTorch's derivatives (``tools/autograd/derivatives.yaml``: ``mm``
saves the input only when the weight needs a gradient, ``mul`` saves the other operand, ``pow``/
``rsqrt`` save their input, ``softmax``/``tanh`` their output), autocast's cast lists (linear and
attention run in 16-bit, ``softmax``/``layer_norm`` in fp32, casts of non-leaf tensors are not cached),
and the modeling code of ``transformers`` 5.x (RMSNorm upcasts to fp32, RoPE multiplies by fp32
cos/sin, ``repeat_kv`` in eager attention, PEFT LoRA casts its input to the adapter dtype).
Checked against GPU probes in ``validation/probes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..models.spec import Block, ModelSpec
from .quant import bnb_dequantizes


@dataclass(frozen=True, slots=True)
class Mode:
    """What the precision and method mean for the tensors of one layer."""

    precision: str  # "true" (bf16/16-true), "32" (32-true), "mixed" (autocast over fp32 weights)
    trainable_base: bool  # full fine-tuning: base weights need gradients
    lora_targets: frozenset[str]  # leaf names of LoRA-wrapped linears
    lora_rank: int
    attention: str  # sdpa, eager, flash
    seq_len: int
    dropout: float  # training dropout probability of the residual/attention dropouts
    quant4: bool = False  # the layer's linears are bitsandbytes Linear4bit (nf4/fp4): a 16-bit compute copy each way
    rows: int = 0  # rows of a 4-bit matmul's input (batch x sequence): whether bitsandbytes dequantizes the weight
    double_quant: bool = False  # 4-bit absmax are themselves 8-bit (nested), dequantized to fp32 per call
    quant_block: int = 64  # weights per 4-bit absmax
    experts_trained: bool = False  # fused MoE experts take gradients (full fine-tuning, or PEFT's ParamWrapper)

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "32" else 2


def _promote(a: int, b: int) -> int:
    return max(a, b)


#: Rows the persistent (warp-per-row) softmax kernels of CUDA take: at most 1024 elements and 4096 bytes
#: (aten/src/ATen/native/cuda/SoftMax.cu ``host_softmax_backward``: ``dim_size <= 1024 && dim_size*sizeof(scalar_t)
#: <= 4096``, softmax over the innermost dimension).
PERSISTENT_SOFTMAX_ELEMENTS = 1024
PERSISTENT_SOFTMAX_BYTES = 4096


def softmax_backward_scratch(row_elements: int, itemsize: int, innermost: bool = True) -> bool:
    """Whether CUDA's softmax backward materializes ``tmp = grad * output`` (a gradient-sized temporary) before
    its kernel. aten/src/ATen/native/cuda/SoftMax.cu ``softmax_backward_cuda_out`` (an older revision; torch
    2.11's was not at hand) makes it for every row: ``Tensor tmp = grad * output``, which the block kernel's
    ``SoftMaxBackwardEpilogue`` reads as "gradOutput * output". The torch 2.11 runs on the H200 show it only for
    rows the persistent (warp-per-row) kernel cannot take - over 1024 elements or 4096 bytes, or not the innermost
    dimension -, consistent with persistent kernels that form ``sum(grad * output)`` themselves (as a port of a
    later PersistentSoftmax.cuh does): the math attention kernel of checkpointed QLoRA mistral-7b peaks at four
    score-sized tensors in its softmax backward with 2048 keys, at three with 1024 (traced with the temporary
    there: 5.4 % over)."""
    if not innermost:
        return True
    return row_elements > PERSISTENT_SOFTMAX_ELEMENTS or row_elements * itemsize > PERSISTENT_SOFTMAX_BYTES


class _Replay:
    """Replays ops over named tensors (sizes in elements per token) and collects what is saved."""

    def __init__(self, mode: Mode):
        self.m = mode
        self.size: dict[str, float] = {}
        self.dtype: dict[str, int] = {}
        self.base: dict[str, str] = {}  # view -> storage owner
        self.saved: dict[str, float] = {}  # storage -> bytes per token
        self.order: list[str] = []  # tensors (and extra saved buffers) in the order the forward makes them
        self.until: dict[str, str] = {}  # tensor -> the later tensor right after whose allocation it is freed
        self._n = 0
        self.softmax_fp32 = True
        self.materialized_mask = False  # the model passes an explicit attention mask to sdpa (Falcon)
        self.q_from_cat = False  # the model builds q with torch.cat (partial rotary, MLA): a contiguous (B, H, S, D)
        self.out_bshd = False  # the last attention's output is (B, S, H, D) in memory: o_proj takes it as is
        self.window_mask = False  # a sliding-window (or chunked) layer whose window the sequence reaches
        self.fixed: dict[str, float] = {}  # temporaries of a fixed size, not per token (a dequantized weight)
        self.math_inputs: list[str] = []  # q, k, v of the last math-kernel attention (its caller's locals)
        # the math kernel's softmax backward: (probabilities, repeated v, bytes per token of the tensors made there)
        self.math_backward: tuple[str, str, tuple[float, ...]] | None = None

    # -- helpers --------------------------------------------------------------
    def new(self, name: str, size: float, dtype: int) -> str:
        self.size[name] = size
        self.dtype[name] = dtype
        self.base[name] = name
        self.order.append(name)
        return name

    def tmp(self, size: float, dtype: int) -> str:
        self._n += 1
        return self.new(f"_t{self._n}", size, dtype)

    def wtmp(self, nbytes: float) -> str:
        """A temporary whose size does not scale with the tokens (a 4-bit weight dequantized for one matmul)."""
        name = self.tmp(0.0, 1)
        self.fixed[name] = nbytes
        return name

    def dequant4_scratch(self, in_features: float, out_features: float) -> list[str]:
        """What a 4-bit matmul of training shapes allocates besides its output and frees when it returns.

        bitsandbytes 0.50 ``backends/cuda/ops.py``: ``gemm_4bit`` for more than ``_gemm_4bit_custom_max_m``
        (1536) rows takes ``_dequant_linear_fallback``: under double quantization the nested absmax dequantized
        to fp32 (``absmax_dq``, then ``absmax = absmax_dq + absmax_offset``: two fp32 tensors, one value per
        block of ``blocksize`` weights), then ``B_dq = torch.empty(shapeB, dtype=A.dtype)`` (the whole weight in
        the 16-bit compute dtype) and ``F.linear(A, B_dq)``; the locals go when the call returns. Below that,
        :func:`memfit.estimator.quant.bnb_dequantizes` says where its own kernel (no dequantized weight) runs instead."""
        if not bnb_dequantizes(self.m.rows, int(out_features), int(in_features)):
            return []
        numel = in_features * out_features
        blocks = -(-numel // self.m.quant_block)
        out = [self.wtmp(4 * blocks), self.wtmp(4 * blocks)] if self.m.double_quant else []
        out.append(self.wtmp(2 * numel))
        return out

    def save(self, name: str) -> None:
        owner = self.base[name]
        self.saved[owner] = self.size[owner] * self.dtype[owner]

    def save_bytes(self, key: str, nbytes: float) -> None:
        self.saved[key] = nbytes
        self.order.append(key)

    def cast(self, name: str, dtype: int) -> str:
        """A dtype cast: the same tensor if it already has the dtype, else a new one."""
        if self.dtype[name] == dtype:
            return name
        return self.tmp(self.size[name], dtype)

    @property
    def mixed(self) -> bool:
        return self.m.precision == "mixed"

    # -- ops ------------------------------------------------------------------
    def norm(self, x: str, y: str, kind: str, trainable: bool | None = None) -> None:
        trainable = self.m.trainable_base if trainable is None else trainable
        n, dt = self.size[x], self.dtype[x]
        if kind == "layer":
            xin = self.cast(x, 4) if self.mixed else x  # layer_norm runs in fp32 under autocast
            self.save(xin)
            self.save_bytes(y + ".stats", 8)  # mean and rstd, fp32, per token
            self.new(y, n, 4 if self.mixed else dt)
            return
        # transformers 5.17 LlamaRMSNorm.forward (Qwen2/3, Mistral, Phi-3, OLMo alike): ``hidden_states.to(float32)``,
        # ``variance = hidden_states.pow(2).mean(-1, keepdim=True)`` (the fp32 square is freed once the mean
        # exists), ``hidden_states = hidden_states * torch.rsqrt(variance + eps)`` (fp32; ``rsqrt`` keeps its
        # output), ``return self.weight * hidden_states.to(input_dtype)``: the locals (the variance, the fp32
        # product) live until the norm returns. Gemma's ``_norm(x.float()) * (1.0 + self.weight.float())`` then
        # ``type_as(x)``: the fp32 product and its scaled copy. Traced: the fp32 square and product are where
        # later same-sized requests land, which sets how the layer's segments are cut.
        x32 = x if dt == 4 else self.tmp(n, 4)
        self.save(x32)  # pow / mul(x, rsqrt) keep the fp32 input
        sq = self.tmp(n, 4)
        var = self.tmp(1, 4)
        self.until[sq] = var
        rs = self.tmp(1, 4)
        self.save(rs)
        h = self.tmp(n, 4)  # x * rsqrt, fp32
        if x32 != x:
            self.until[x32] = h  # the name rebound to the product: its fp32 input goes once that exists
        if kind == "gemma_rms":
            if trainable:
                self.save(h)  # normed fp32, kept for the (1 + w) gradient
            if dt == 4:
                last = self.new(y, n, dt)
            else:
                scaled = self.tmp(n, 4)
                last = self.new(y, n, dt)
                self.until[scaled] = last
            self.until.setdefault(h, self.order[-1] if dt == 4 else scaled)
        else:
            back = None
            if dt == 4:
                if trainable:
                    self.save(h)  # normed, kept for the weight gradient
            elif trainable:
                self.save(self.tmp(n, dt))  # normed, cast back, kept for the weight gradient
            else:
                back = self.tmp(n, dt)  # normed, cast back: ``self.weight *`` it makes the output, then it goes
            last = self.new(y, n, dt)
            if back is not None:
                self.until[back] = last
            if h not in self.saved:
                self.until[h] = last
        self.until[var] = last

    def linear(self, x: str, y: str, name: str, out: float, trainable: bool | None = None) -> None:
        trainable = self.m.trainable_base if trainable is None else trainable
        if trainable:
            self.save(self.cast(x, 2) if self.mixed else x)
        lora = name in self.m.lora_targets
        out_dtype = 2 if self.mixed else self.dtype[x]
        if self.m.quant4 and not trainable:
            # bitsandbytes 0.50 nn/modules.py Linear4bit.forward: ``x.to(compute_dtype)`` (16-bit), matmul_4bit
            # (MatMul4Bit saves no activation: ``ctx.tensors = (None, B)``; its dequantized weight is the
            # quantization scratch counted on its own), then ``.to(inp_dtype)``: both 16-bit tensors live until
            # that cast back exists
            out_dtype = self.dtype[x]
            x16 = self.cast(x, 2)
            scratch = self.dequant4_scratch(self.size[x], out)
            if out_dtype == 2:
                base = self.new(y, out, 2) if not lora else self.tmp(out, 2)
                o16 = base
            else:
                o16 = self.tmp(out, 2)
                base = self.new(y, out, out_dtype) if not lora else self.tmp(out, out_dtype)
                self.until[o16] = base
                self.until[x16] = base
            for t in scratch:  # freed when the matmul returns its 16-bit output
                self.until[t] = o16
        else:
            base = self.new(y, out, out_dtype) if not lora else self.tmp(out, out_dtype)
        if not lora:
            return
        # peft 0.21 tuners/lora/layer.py Linear.forward: ``result = self.base_layer(x)``, ``x =
        # self._cast_input_dtype(x, lora_A.weight.dtype)``, ``result = result + lora_B(lora_A(dropout(x))) *
        # scaling``, ``result = result.to(torch_result_dtype)``: lora_B's output, its scaled copy and the sum
        # are output-sized, in the adapters' fp32 (their 16-bit autocast casts under mixed precision); the
        # base output lives until the sum exists, the adapter-dtype input until the layer returns
        adapter_dtype = 2 if self.mixed else 4  # PEFT keeps adapters in fp32; autocast runs them in 16-bit
        x_in = x
        if self.mixed:
            # ``_cast_input_dtype`` makes a 16-bit input fp32, then autocast casts it back for lora_A: a fresh
            # 16-bit copy per adapter even where the input is already 16-bit (o_proj after attention, down_proj)
            x32 = self.cast(x, 4)
            xa = self.tmp(self.size[x], 2)
        else:
            x32 = None
            xa = self.cast(x, adapter_dtype)  # lora_A input (a fresh cast per adapter)
        self.save(xa)
        a = self.tmp(self.m.lora_rank, adapter_dtype)
        self.save(a)  # lora_A output, lora_B input
        b = self.tmp(out, adapter_dtype)
        self.until[a] = b
        m = self.tmp(out, adapter_dtype)
        self.until[b] = m
        total_dtype = _promote(self.dtype[base], adapter_dtype)
        if total_dtype == out_dtype:
            s = self.new(y, out, total_dtype)
            last = s
        else:
            s = self.tmp(out, total_dtype)
            last = self.new(y, out, out_dtype)
            self.until[s] = last
        self.until[m] = s
        self.until[base] = s
        for t in (x32, xa):
            if t is not None and t != x_in:
                self.until[t] = last

    def rope(self, x: str, y: str) -> None:
        # x * cos + rotate_half(x) * sin: cos/sin carry the dtype of the hidden states (fp32 under autocast)
        self.new(y, self.size[x], 4 if self.mixed else self.dtype[x])

    def add(self, a: str, b: str, y: str) -> None:
        self.new(y, max(self.size[a], self.size[b]), _promote(self.dtype[a], self.dtype[b]))

    def copy(self, x: str, y: str) -> None:
        self.new(y, self.size[x], self.dtype[x])

    def view(self, x: str, y: str, size: float) -> None:
        self.size[y] = size
        self.dtype[y] = self.dtype[x]
        self.base[y] = self.base[x]

    def act(self, x: str, y: str, kind: str) -> None:
        n, dt = self.size[x], self.dtype[x]
        if kind == "gelu_new":  # 0.5*x*(1+tanh(c*(x+0.044715*x**3))) in Python: four tensors kept
            if self.mixed:
                # pow is an fp32 op under autocast: it keeps autocast's fp32 copy of x, not x (the scalar
                # product 0.5 * x keeps nothing); tanh, 1+tanh and the product are fp32. transformers 5.17
                # activations.py NewGELUActivation.forward; traced: GPT-2 bf16-mixed keeps x.float(), not x
                self.save(self.tmp(n, 4))  # autocast's fp32 copy of x, kept by pow
                self.save(self.tmp(n, 4))  # tanh output
                self.save(self.tmp(n, dt))  # 0.5 * x
                self.save(self.tmp(n, 4))  # 1 + tanh
                self.new(y, n, 4)
                return
            self.save(x)  # pow keeps its input
            for _ in range(3):
                self.save(self.tmp(n, dt))
        elif kind == "relu":  # relu keeps its output, the same tensor the next linear keeps
            self.new(y, n, dt)
            self.save(y)
            return
        else:  # silu, gelu, gelu_pytorch_tanh: the input
            self.save(x)
        self.new(y, n, dt)

    def mul(self, a: str, b: str, y: str) -> None:
        self.save(a)
        self.save(b)
        self.new(y, max(self.size[a], self.size[b]), _promote(self.dtype[a], self.dtype[b]))

    def dropout(self, x: str, y: str, p: float) -> str:
        if p <= 0:
            return x
        self.save_bytes(y + ".mask", self.size[x])  # bool mask, one byte per element
        self.new(y, self.size[x], self.dtype[x])
        return y

    def attention(self, q: str, k: str, v: str, o: str, *, nh: int, kvh: int, dqk: int, dv: int,
                  softcap: bool = False, p_drop: float = 0.0, sinks: bool = False) -> None:
        S = self.m.seq_len
        e = 2 if self.mixed else self.m.act_bytes
        kernel = self.m.attention
        broadcast_kv = False
        self.out_bshd = False
        mask_per_token = 0.0
        if kernel == "sdpa" and self.window_mask and not self.materialized_mask and not sinks:
            # transformers 5.17 masking_utils._ignore_causal_mask_sdpa skips the mask only while the keys are fewer
            # than the window: here sdpa gets a boolean (B, 1, S, S) mask, so sdpa_attention_forward repeats k and v
            # (use_gqa_in_sdpa needs no mask; repeat_kv's reshape copies them unless there is one k/v head) and the
            # memory-efficient kernel runs; ATen attention.cpp convert_boolean_attn_mask makes an additive mask of
            # q's dtype, preprocess_mask pads its keys to a multiple of 16 (materializing all heads when it pads),
            # and the kernel keeps it for backward, one per layer. With one k/v head the repeat is an expanded
            # view, which autocast's cast (where k or v is not yet 16-bit) materializes for every head.
            if 1 < kvh < nh:
                k, v = self.tmp(nh * dqk, self.dtype[k]), self.tmp(nh * dv, self.dtype[v])
            elif kvh < nh:
                k = self.tmp(nh * dqk, e) if self.dtype[k] != e else k
                v = self.tmp(nh * dv, e) if self.dtype[v] != e else v
            mask_per_token = e * (S if S % 16 == 0 else nh * (S + 16 - S % 16))
            kernel = "efficient"
        if kernel == "sdpa" and e == 4 and kvh < nh:
            kernel = "math"  # fp32 + GQA: flash needs 16-bit, memory-efficient has no GQA
        if kernel == "sdpa" and self.materialized_mask and kvh < nh:
            # an explicit mask rules out flash, and memory-efficient cannot broadcast one k/v head over many:
            # PyTorch falls back to the math kernel, which broadcasts k and v without copying them
            kernel, broadcast_kv = "math", True
        if kernel == "sdpa" and sinks:
            kernel = "eager"  # gpt-oss runs eagerly (GptOssPreTrainedModel._supports_sdpa = False)
        # Softcapped attention (Gemma 2) under sdpa runs the fused kernel: transformers 5.17
        # integrations/sdpa_attention.py takes no ``softcap`` (Gemma2Attention passes it, sdpa ignores it)
        if kernel in ("sdpa", "flash", "efficient"):
            # Where the output lies in memory decides whether ``attn_output.transpose(1, 2).contiguous()``
            # (transformers 5.17 integrations/sdpa_attention.py, then ``reshape(...).contiguous()`` before o_proj)
            # copies it. The memory-efficient kernel (fp32, or q/k and v head dims that differ) writes
            # (B, S, H, D) and returns its transpose; flash and cuDNN allocate the output like q
            # (aten/src/ATen/native/transformers/cuda: ``empty_like(q)`` / q's strides). q is a transposed view
            # of its projection, or elementwise ops over one (RoPE, q/k norms keep the layout), so (B, S, H, D) as
            # well - unless the model builds it with ``torch.cat`` (GPT-NeoX and Phi-3 partial rotary, MLA),
            # which returns a contiguous (B, H, S, D). Traced: no copy for Llama, GPT-2, DistilBERT; one for
            # Phi-3 and Pythia.
            efficient = kernel == "efficient" or (kernel == "sdpa" and (e == 4 or dqk != dv))
            self.out_bshd = efficient or not self.q_from_cat
            for t in (q, k, v):
                self.save(self.cast(t, e) if self.mixed else t)
            self.new(o, nh * dv, e)
            self.save(o)
            self.save_bytes(o + ".lse", 4 * nh)
            if mask_per_token:
                self.save_bytes(o + ".mask", mask_per_token)
            return
        if kernel == "math":
            # PyTorch's math kernel computes in fp32 (16-bit inputs are upcast unless
            # allow_fp16_bf16_reduction_math_sdp is set) and keeps scaled q and k, repeated (or broadcast)
            # k and v, and the softmax output
            kv_heads = kvh if broadcast_kv else nh
            # the kernel's locals until it returns (ATen attention.cpp _scaled_dot_product_attention_math):
            # ``query * sqrt(scale)``, the causal mask ``is_causal`` makes (``ones(L, S, bool).tril()`` made an
            # fp32 additive mask: (S, S), per call, not per token), and the keys repeated for the query groups
            # (``pre_process_group_query_attention_input``: repeat_interleave); traced: QLoRA mistral-7b
            local = [self.tmp(nh * dqk, 4)] if e == 4 else []
            if not self.materialized_mask:
                local.append(self.wtmp(4 * S * S))
            if kvh < nh and not broadcast_kv:
                local.append(self.tmp(nh * dqk, 4))
            self.save(self.tmp(nh * dqk, 4))
            self.save(self.tmp(kv_heads * dqk, 4))
            v_exp = self.tmp(kv_heads * dv, 4)
            self.save(v_exp)
            # the scores (``attn = q @ k^T``, the mask added in place), then ``_safe_softmax`` as it runs on the
            # device (attention.cpp, CompositeExplicitAutograd): the softmax, ``isneginf`` (bool) and
            # ``where(masked_rows, 0, out, out=out)`` written into the softmax output, the tensor autograd keeps;
            # the scores and the mask go when it returns (torch 2.13 op by op on the CPU; measured under torch
            # 2.11: the checkpointed QLoRA forward peaks at 2.25 score-sized tensors in a layer, not 3.25)
            scores, probs, masked = self.tmp(nh * S, 4), self.tmp(nh * S, 4), self.tmp(nh * S, 1)
            self.save(probs)
            self.until[scores] = masked
            self.until[masked] = masked
            # backward through it (autograd, after o_proj's): the second bmm's backward makes the gradients of
            # the probabilities and of the repeated v and releases v; ``_softmax_backward_data`` makes its result
            # and, on CUDA for rows over 1024 keys, ``tmp = grad * output`` (softmax_backward_scratch): four
            # score-sized tensors with the kept probabilities, the saved tensors of the layer's later ops already
            # released (see :func:`math_softmax_backward`)
            tmp = nh * S * 4 if softmax_backward_scratch(S, 4) else 0.0
            self.math_backward = (probs, v_exp, (nh * S * 4, kv_heads * dv * 4, nh * S * 4, tmp))
            self.new(o, nh * dv, e)
            for t in local:
                self.until[t] = o
            # q, k and v themselves are the attention module's locals (``query_states``...) until it returns,
            # after o_proj (transformers 5.17 modeling_llama.py / modeling_mistral.py Attention.forward)
            self.math_inputs = [t for t in (q, k, v) if self.base.get(t) == t]
            return
        # eager: repeat_kv, q @ k^T, softmax in fp32, cast back, (dropout), @ v
        krep = k if kvh == nh else self.tmp(nh * dqk, self.dtype[k])
        vrep = v if kvh == nh else self.tmp(nh * dv, self.dtype[v])
        self.save(self.cast(q, e) if self.mixed else q)
        self.save(self.cast(krep, e) if self.mixed else krep)
        if softcap:
            self.save(self.tmp(nh * S, e))  # tanh output
        if sinks:
            # gpt-oss eager_attention_forward (transformers 5.17): softmax over cat(scores, sinks) minus its
            # max, in the scores' dtype (fp32 under autocast, as GPT-2's); backward keeps its output, one
            # column wider, and under autocast the 16-bit cast of the sliced probabilities for the value matmul
            self.save(self.tmp(nh * (S + 1), 4 if self.mixed else e))
            if self.mixed:
                self.save(self.tmp(nh * S, 2))
        elif self.softmax_fp32:
            self.save(self.tmp(nh * S, 4))  # softmax(dtype=float32) output
            probs_dtype = self.dtype[q]
            if p_drop > 0:
                pass  # the cast feeds the dropout, which keeps only its mask: the matmul keeps the dropout's output
            elif probs_dtype != 4:
                self.save(self.tmp(nh * S, probs_dtype))  # .to(query.dtype)
            elif self.mixed:
                self.save(self.tmp(nh * S, 2))  # autocast casts the fp32 probabilities for the matmul
        else:  # GPT-2 style: softmax in the scores' dtype (fp32 under autocast: softmax is an fp32 op)
            self.save(self.tmp(nh * S, 4 if self.mixed else e))
            if self.mixed and not p_drop > 0:
                self.save(self.tmp(nh * S, 2))
        if p_drop > 0:
            # dropout keeps its mask, not its output (native_dropout_backward needs the mask only); the value
            # matmul keeps its input: the dropout's output, under autocast its 16-bit cast (e bytes either way).
            # transformers 5.17 modeling_bert.py / modeling_gpt2.py eager_attention_forward: softmax, dropout, @ v
            self.save_bytes(o + ".attn_mask", nh * S)
            self.save(self.tmp(nh * S, e))
        self.save(self.cast(vrep, e) if self.mixed else vrep)
        self.new(o, nh * dv, e)

    def moe(self, x: str, y: str, block: Block) -> None:
        moe = block.moe
        H = self.size[x]
        e = 2 if self.mixed else self.dtype[x]
        # the experts' weights take gradients (full fine-tuning; PEFT's ParamWrapper around the fused expert tensors
        # under ``all-linear``, whose merged weight needs the gathered input too): their inputs are kept. Traced:
        # olmoe-1b-7b LoRA all-linear bf16 B1 S1024, 31.32 GiB peak measured, 30.41 estimated without the rows
        train = self.m.trainable_base or self.m.experts_trained
        # router: linear -> softmax (fp32) -> top-k
        self.linear(x, y + ".router", "gate", moe.num_experts)
        self.save(self.tmp(moe.num_experts, 4))
        k = moe.routed_copies  # top_k; every expert where transformers runs them all (Llama 4)
        Ie = moe.expert_intermediate_size
        # each routed copy of a token: gathered input, gate_up, activation, product, down output
        per_copy = (H if train else 0) + 2 * Ie + Ie + Ie + H
        self.save_bytes(y + ".experts", k * per_copy * e)
        if moe.shared_intermediate_size:
            self.mlp(x, y + ".shared", moe.shared_intermediate_size, gated=True, act="silu",
                     names=("gate_proj", "up_proj", "down_proj"))
            if moe.shared_expert_gate:
                self.save(self.tmp(H, e))
        self.new(y, H, self.dtype[x])

    def mlp(self, x: str, y: str, inter: int, *, gated: bool, act: str, names: tuple[str, ...],
            fused_gate_up: bool = False) -> None:
        if gated:
            if fused_gate_up:
                self.linear(x, y + ".gu", names[0], 2 * inter)
                self.view(y + ".gu", y + ".g", inter)
                self.view(y + ".gu", y + ".u", inter)
            else:
                self.linear(x, y + ".g", names[0], inter)
                self.linear(x, y + ".u", names[1], inter)
            self.act(y + ".g", y + ".a", act)
            self.mul(y + ".a", y + ".u", y + ".p")
            self.linear(y + ".p", y, names[-1], self.size[x])
        else:
            self.linear(x, y + ".h", names[0], inter)
            self.act(y + ".h", y + ".a", act)
            self.linear(y + ".a", y, names[-1], self.size[x])


def _names(block: Block) -> dict[str, str]:
    """Map roles to the block's real module names."""
    out: dict[str, str] = {}
    for lin in block.linears:
        out.setdefault(lin.role, lin.name)
    return out


def _replay_layer(spec: ModelSpec, block: Block, mode: Mode) -> float:
    return sum(_run_layer(spec, block, mode).saved.values())


def _run_layer(spec: ModelSpec, block: Block, mode: Mode) -> _Replay:
    r = _Replay(mode)
    r.softmax_fp32 = spec.model_type not in ("gpt2", "bert", "roberta", "distilbert", "falcon")
    r.materialized_mask = spec.model_type == "falcon"  # create_causal_mask(allow_is_causal_skip=False)
    # apply_rotary_pos_emb ends in torch.cat in transformers 5.17 modeling_gpt_neox.py, modeling_phi3.py and
    # modeling_gpt_oss.py (_apply_rotary_emb); DeepSeek's MLA concatenates the rope and no-rope parts of q
    r.q_from_cat = spec.model_type in ("gpt_neox", "phi3", "gpt_oss") or block.attention.kind == "mla"
    window = block.attention.sliding_window
    r.window_mask = bool(window) and mode.seq_len >= window
    H = spec.hidden_size
    at = block.attention
    nh, kvh, d, dv = at.num_heads, at.num_kv_heads, at.head_dim, at.v_head_dim
    names = _names(block)
    res_dtype = 4 if mode.precision in ("32", "mixed") else 2
    x = r.new("x", H, res_dtype)
    p = mode.dropout

    def attention_part(inp: str) -> str:
        if at.kind == "mla":
            if at.q_lora_rank:
                r.linear(inp, "qa", names.get("q_a", "q_a_proj"), at.q_lora_rank)
                r.norm("qa", "qan", "rms")
                r.linear("qan", "q", names.get("q_b", "q_b_proj"), nh * d)
            else:
                r.linear(inp, "q", names.get("q", "q_proj"), nh * d)
            r.linear(inp, "kva", names.get("kv_a", "kv_a_proj_with_mqa"), at.kv_lora_rank + at.qk_rope_head_dim)
            r.view("kva", "kvc", at.kv_lora_rank)
            r.norm("kvc", "kvn", "rms")
            r.linear("kvn", "kvb", names.get("kv_b", "kv_b_proj"), nh * (d - at.qk_rope_head_dim + dv))
            r.view("kvb", "v", nh * dv)
            r.rope("q", "qr")
            r.new("k", nh * d, r.dtype["q"])  # cat(k_nope, k_rope expanded)
            r.attention("qr", "k", "v", "o", nh=nh, kvh=nh, dqk=d, dv=dv)
        else:
            if "qkv" in names:
                r.linear(inp, "qkv", names["qkv"], (nh + 2 * kvh) * d)
                r.view("qkv", "q", nh * d)
                r.view("qkv", "k", kvh * d)
                r.view("qkv", "v", kvh * dv)
            else:
                r.linear(inp, "q", names.get("q", "q_proj"), nh * d)
                r.linear(inp, "k", names.get("k", "k_proj"), kvh * d)
                r.linear(inp, "v", names.get("v", "v_proj"), kvh * dv)
            q, k = "q", "k"
            if at.qk_norm:
                r.norm("q", "qn", "gemma_rms" if block.norm == "gemma_rms" else "rms")
                r.norm("k", "kn", "gemma_rms" if block.norm == "gemma_rms" else "rms")
                q, k = "qn", "kn"
            if at.rope and spec.model_type not in ("gpt2", "opt", "bert", "roberta", "distilbert"):
                r.rope(q, "qr")
                r.rope(k, "kr")
                q, k = "qr", "kr"
            r.attention(q, k, "v", "o", nh=nh, kvh=kvh, dqk=d, dv=dv, softcap=at.softcap is not None,
                        p_drop=p, sinks=at.sinks)
        if r.out_bshd:
            r.linear("o", "ao", names.get("o", "o_proj"), H)
        else:  # (B, H, S, D) from the math or eager product, or a cat-built q: transpose(1, 2).contiguous() copies
            r.copy("o", "oc")
            r.linear("oc", "ao", names.get("o", "o_proj"), H)
        for t in r.math_inputs:
            r.until.setdefault(t, "ao")
        r.math_inputs = []
        if spec.model_type == "distilbert":
            # no dropout after out_lin: transformers 5.17 modeling_distilbert.py MultiHeadSelfAttention.forward
            # returns out_lin's output and TransformerBlock.forward adds it to the residual directly
            return "ao"
        return r.dropout("ao", "aod", p)

    def mlp_part(inp: str) -> str:
        if block.moe is not None:
            r.moe(inp, "mo", block)
            return "mo"
        mlp = block.mlp
        if "gate_up" in names:
            r.mlp(inp, "mo", mlp.intermediate_size, gated=True, act=mlp.activation,
                  names=(names["gate_up"], names.get("down", "down_proj")), fused_gate_up=True)
        elif mlp.gated:
            r.mlp(inp, "mo", mlp.intermediate_size, gated=True, act=mlp.activation,
                  names=(names.get("gate", "gate_proj"), names.get("up", "up_proj"), names.get("down", "down_proj")))
        else:
            r.mlp(inp, "mo", mlp.intermediate_size, gated=False, act=mlp.activation,
                  names=(names.get("up", "fc1"), names.get("down", "fc2")))
        return r.dropout("mo", "mod", p)

    norm = block.norm
    if block.parallel:
        r.norm(x, "y1", norm)
        a = attention_part("y1")
        if block.norms_per_layer >= 2:
            r.norm(x, "y2", norm)
            m = mlp_part("y2")
        else:
            m = mlp_part("y1")
        r.add(a, m, "am")
        r.add(x, "am", "out")
    elif spec.model_type in ("bert", "roberta", "distilbert"):  # post-norm encoder
        a = attention_part(x)
        r.add(x, a, "h")
        r.norm("h", "y1", "layer")
        m = mlp_part("y1")
        r.add("y1", m, "h2")
        r.norm("h2", "out", "layer")
    elif block.norms_per_layer >= 4:  # Gemma 2/3: pre and post norms around both sublayers
        r.norm(x, "y1", norm)
        a = attention_part("y1")
        r.norm(a, "ap", norm)
        r.add(x, "ap", "h")
        r.norm("h", "y2", norm)
        m = mlp_part("y2")
        r.norm(m, "mp", norm)
        r.add("h", "mp", "out")
    else:
        r.norm(x, "y1", norm)
        a = attention_part("y1")
        r.add(x, a, "h")
        r.norm("h", "y2", norm)
        m = mlp_part("y2")
        r.add("h", m, "out")
    return r


@lru_cache(maxsize=4096)
def saved_bytes_per_token(spec: ModelSpec, block_index: int, mode: Mode) -> float:
    """Bytes one token leaves saved for backward in one layer of ``spec.blocks[block_index]``."""
    return _replay_layer(spec, spec.blocks[block_index], mode)


def _held(spec: ModelSpec, block: Block) -> set[str]:
    """Tensors of the layer's forward that a Python name keeps alive until the layer returns, saved or not: the
    layer's input (the caller's ``hidden_states`` is rebound only when the layer returns: transformers 5.17
    ``for layer in self.layers: hidden_states = layer(hidden_states, ...)``), and the residual the second
    sub-layer adds to (``residual = hidden_states`` in the pre-norm decoders; BERT's ``attention_output``,
    which ``BertLayer.forward`` holds while ``feed_forward_chunk`` runs; DistilBERT's ``sa_output``)."""
    if block.parallel:
        return {"x"}
    if spec.model_type in ("bert", "roberta", "distilbert"):
        return {"x", "y1"}
    return {"x", "h"}


@lru_cache(maxsize=4096)
def layer_forward_tensors(spec: ModelSpec, block_index: int, mode: Mode) -> tuple[tuple[float, bool, bool, int | None, float], ...]:
    """:func:`layer_tensors_per_token` with three more fields: whether a Python name holds the tensor until the
    layer returns (:func:`_held`), where the op that makes it scopes its lifetime (a LoRA linear's chain, a 4-bit
    linear's 16-bit copies and dequantized weight): the index of the later tensor right after whose allocation it
    is freed (unless saved for backward under autograd), else None - the others live until the op after the one
    that consumes them -, and bytes that do not scale with the tokens (a 4-bit linear's dequantized weight and
    absmax, :meth:`_Replay.dequant4_scratch`; 0 for the others)."""
    block = spec.blocks[block_index]
    r = _run_layer(spec, block, mode)
    held = _held(spec, block)
    keys = [k for k in r.order if k in r.saved or r.base.get(k) == k]
    index = {k: i for i, k in enumerate(keys)}
    out = []
    for key in keys:
        until = index.get(r.until[key]) if key in r.until else None
        if key in r.saved:
            out.append((r.saved[key], True, key in held, until, 0.0))
        else:
            out.append((r.size[key] * r.dtype[key], False, key in held, until, r.fixed.get(key, 0.0)))
    return tuple(out)


@lru_cache(maxsize=4096)
def math_softmax_backward(spec: ModelSpec, block_index: int,
                          mode: Mode) -> tuple[tuple[int, ...], int, int, tuple[float, ...]] | None:
    """The moment a layer's backward through the math attention kernel peaks, or None where it has none: the
    softmax backward. As indices into :func:`layer_forward_tensors` - of the saved tensors released before it, of
    the repeated v and of the probabilities - and the bytes per token of the gradient of the probabilities, of the
    repeated v, of the scores and of CUDA's ``tmp``, in the order they are made.

    Autograd runs the layer's ops backward from its output: by the time it reaches the attention, the nodes of
    every later op (o_proj, the residual add, the MLP and its norm) have run and released what they saved. The
    second bmm's backward (``attn @ v``) makes the gradients of the probabilities and of the repeated v, then
    releases v (the probabilities stay: the softmax node keeps them). ``_softmax_backward_data`` allocates its
    result, then on CUDA, for rows of more than 1024 keys, ``tmp = grad * output`` for its kernel
    (:func:`softmax_backward_scratch`; the CPU kernel makes the result only): with the kept probabilities four
    score-sized fp32 tensors (B x heads x S x S) at once, after which the gradient of the probabilities, ``tmp``
    and the probabilities go. The layer's input, its attention input and the saved q and k are still alive (the
    first bmm's backward needs them). Measured on the H200 (torch 2.11): the checkpointed QLoRA runs of
    mistral-7b at 2048 tokens peak here."""
    r = _run_layer(spec, spec.blocks[block_index], mode)
    if r.math_backward is None:
        return None
    probs, v_exp, made = r.math_backward
    keys = [k for k in r.order if k in r.saved or r.base.get(k) == k]
    at = keys.index(probs)
    released = tuple(i for i, k in enumerate(keys) if k in r.saved and i > at)
    return released, keys.index(v_exp), at, made


@lru_cache(maxsize=4096)
def layer_tensors_per_token(spec: ModelSpec, block_index: int, mode: Mode) -> tuple[tuple[float, bool], ...]:
    """The tensors one layer's forward makes, in order, as (bytes per token, saved for backward).

    The same replay as :func:`saved_bytes_per_token` (the saved entries add up to it); the others are the
    forward's temporaries (a tensor no backward formula keeps, freed once the next op has consumed it).
    Views share their owner's storage and are not listed; the layer's output (the next layer's input) is."""
    r = _run_layer(spec, spec.blocks[block_index], mode)
    out = []
    for key in r.order:
        if key in r.saved:
            out.append((r.saved[key], True))
        elif r.base.get(key) == key and key not in r.fixed:
            out.append((r.size[key] * r.dtype[key], False))
    return tuple(out)
