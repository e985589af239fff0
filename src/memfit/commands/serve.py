"""`memfit serve`: what vLLM or SGLang will give to the KV cache, and what max_model_len fits (no torch)."""

from __future__ import annotations

import argparse
import json


def _fraction(text: str) -> float:
    try:
        return float(text)  # NaN, inf and values outside (0, 1] are ServeConfig's one-line error, naming the setting
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.9; got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="KV cache tokens, blocks and concurrency vLLM / SGLang will give you",
                       description="Predict a serving engine's start-up memory split: weights, profile peak, "
                                   "non-torch memory, CUDA graphs, KV cache blocks and tokens, max concurrency.")
    p.add_argument("model", help="registry name (memfit models), config.json path, or Hub id")
    p.add_argument("--engine", default="vllm", choices=("vllm", "sglang"))
    p.add_argument("--engine-version", dest="engine_version", help="e.g. 0.6.3, 0.8, 0.11 (vLLM); 0.4, 0.5 (SGLang)")
    p.add_argument("--engine-mode", dest="engine_mode", choices=("v0", "v1"), help="vLLM engine (default by version)")
    p.add_argument("--gpu", help="card name from the GPU catalog (h100-80gb, a100-80gb, rtx-4090, ...)")
    p.add_argument("--gpu-memory", dest="gpu_memory", help="total memory the driver reports, with its unit: 79.19GiB")
    p.add_argument("--tensor-parallel", "--tensor-parallel-size", "--tp", dest="tensor_parallel", type=int, default=1)
    p.add_argument("--pipeline-parallel", "--pipeline-parallel-size", "--pp", dest="pipeline_parallel", type=int,
                   default=1)
    p.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=_fraction)
    p.add_argument("--mem-fraction-static", dest="mem_fraction_static", type=_fraction)
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int)
    p.add_argument("--max-num-seqs", "--max-running-requests", dest="max_num_seqs", type=int)
    p.add_argument("--max-num-batched-tokens", "--chunked-prefill-size", dest="max_num_batched_tokens", type=int)
    p.add_argument("--kv-cache-dtype", dest="kv_cache_dtype", default="auto")
    p.add_argument("--quantization", choices=("none", "fp8", "awq", "gptq", "bitsandbytes", "w8a8", "w4a16", "mxfp4"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true")
    p.add_argument("--block-size", "--page-size", dest="block_size", type=int)
    p.add_argument("--cuda-graph-max-bs", dest="cuda_graph_max_bs", type=int)
    p.add_argument("--disable-hybrid-kv-cache-manager", dest="disable_hybrid_kv_cache_manager", action="store_true")
    p.add_argument("--data-parallel", "--data-parallel-size", "--dp", dest="data_parallel", type=int,
                   help="vLLM --data-parallel-size: engines of TP x PP GPUs each (default 1); MoE layers are "
                        "split over all DP x TP ranks")
    p.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true",
                   help="vLLM: MoE layers hold whole experts, spread over the DP x TP ranks")
    p.add_argument("--enable-lora", dest="enable_lora", action="store_true",
                   help="vLLM: stack --max-loras adapter slots of rank --max-lora-rank beside every LoRA layer")
    p.add_argument("--max-loras", dest="max_loras", type=int, help="vLLM LoRA slots (default 1; needs --enable-lora)")
    p.add_argument("--max-lora-rank", dest="max_lora_rank", type=int,
                   help="vLLM largest LoRA rank (default 16; needs --enable-lora)")
    p.add_argument("--sampler",  # checked by ServeConfig: a bad value is memfit's one-line error
                   help="native or flashinfer: vLLM V1's top-k/top-p sampler; flashinfer where the log says 'Using FlashInfer for "
                        "top-p & top-k sampling' (default native, the PyTorch sort)")
    p.add_argument("--text-only", dest="text_only", action="store_true",
                   help="multimodal checkpoint served without its vision tower (vLLM --limit-mm-per-prompt all 0)")
    p.add_argument("--requests", type=int, help="with --tokens: the smallest utilization (or --fewest-gpus) for "
                   "this many concurrent requests")
    p.add_argument("--tokens", type=int, help="tokens per request for --requests")
    p.add_argument("--fewest-gpus", dest="fewest_gpus", action="store_true",
                   help="with --requests/--tokens: the fewest GPUs instead of the smallest utilization")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run)


_FLAGS = ("engine_version", "engine_mode", "tensor_parallel", "pipeline_parallel", "gpu_memory_utilization",
          "mem_fraction_static", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_dtype",
          "quantization", "dtype", "enforce_eager", "block_size", "cuda_graph_max_bs",
          "disable_hybrid_kv_cache_manager", "text_only", "data_parallel", "enable_expert_parallel", "enable_lora",
          "max_loras", "max_lora_rank", "sampler")


def run(args: argparse.Namespace) -> int:
    from ..errors import JobError
    from ..serve import fewest_gpus, min_utilization, serve
    from ..units import parse_card_memory

    # `is` checks: a 0 the user typed (--data-parallel 0) must reach the check, not read as "not given"
    flags = {k: v for k in _FLAGS if (v := getattr(args, k)) is not None and v is not False}
    if args.gpu is None and args.gpu_memory is None:
        raise JobError("name the card: --gpu h100-80gb (memfit gpus) or --gpu-memory 79.19GiB")
    # the size as estimate and plan read it: with its unit (a bare 80 is refused, not taken as 80 bytes)
    gpu_memory = None if args.gpu_memory is None else parse_card_memory(args.gpu_memory)
    common = dict(engine=args.engine, gpu=args.gpu, gpu_memory=gpu_memory)
    if not args.enable_lora and (args.max_loras is not None or args.max_lora_rank is not None):
        raise JobError("--max-loras and --max-lora-rank size vLLM's LoRA slots: add --enable-lora")
    if (args.requests is None) != (args.tokens is None):
        raise JobError("--requests and --tokens go together (N concurrent requests of L tokens)")
    if args.requests is not None:
        if args.fewest_gpus:
            flags.pop("tensor_parallel", None)
            flags.pop("pipeline_parallel", None)
            out = fewest_gpus(args.model, requests=args.requests, tokens=args.tokens, **common, **flags)
        else:
            key = "gpu_memory_utilization" if args.engine == "vllm" else "mem_fraction_static"
            flags.pop(key, None)
            out = min_utilization(args.model, requests=args.requests, tokens=args.tokens, **common, **flags)
        if args.json:
            print(json.dumps(out, indent=1))
            return 0
        if args.fewest_gpus:
            if out["gpus"] is None:
                print(out["reason"])
                return 1
            print(f"{args.requests} requests x {args.tokens} tokens: {out['gpus']} GPUs "
                  f"(tensor parallel {out['tensor_parallel']}, pipeline parallel {out['pipeline_parallel']}; "
                  f"max concurrency {out['estimate']['max_concurrency']:.2f})")
        else:
            if out["utilization"] is None:
                print(out["reason"])
                return 1
            print(f"{args.requests} requests x {args.tokens} tokens: {out['parameter']} >= {out['utilization']:.3f} "
                  f"(KV cache {out['estimate']['kv_cache_tokens']:,} tokens)")
        return 0
    est = serve(args.model, **common, **flags)
    if args.json:
        print(json.dumps(est.to_dict(), indent=1))
        return 0
    print(render(est))
    return 0


def render(est) -> str:
    """The estimate as plain text, GiB = 2**30 bytes."""
    g = 2 ** 30
    knob = "gpu_memory_utilization" if est.engine == "vllm" else "mem_fraction_static"
    mode = f" {est.engine_mode}" if est.engine_mode else ""
    dp = getattr(est, "data_parallel", 1)
    gpus = est.tensor_parallel * est.pipeline_parallel * dp
    layout = f"TP {est.tensor_parallel}, PP {est.pipeline_parallel}" + (f", DP {dp}" if dp > 1 else "")
    lines = [
        f"{est.engine} {est.engine_version}{mode} ({est.rule}) serving {est.model} on "
        f"{gpus} GPU(s) of {est.gpu_memory_bytes / g:.2f} GiB "
        f"({layout}), {knob} {est.utilization} ({est.utilization_source})",
        "per rank (the most constrained one)" + (f"; each of the {dp} engines has this KV cache:" if dp > 1 else ":"),
        f"  weights                 {est.weights_bytes / g:9.2f} GiB  ({est.quantization})",
    ]
    if est.lora_bytes:
        where = "included in the weights" if est.lora_in_weights else "beside the weights, not deducted"
        lines.append(f"  LoRA slots              {est.lora_bytes / g:9.2f} GiB  ({where})")
    lines += [
        f"  profile activation peak {est.activation_peak_bytes / g:9.2f} GiB  ({est.activation_peak_moment}; "
        f"{est.max_num_batched_tokens} tokens)",
        f"  non-torch memory        {est.non_torch_bytes / g:9.2f} GiB",
        f"  CUDA graphs             {est.cuda_graph_bytes / g:9.2f} GiB  "
        f"({'deducted from the KV cache' if est.cuda_graph_deducted else 'not deducted'})",
        f"  KV cache                {est.kv_cache_bytes / g:9.2f} GiB  ({est.kv_bytes_per_token:,} B/token, "
        f"kv_cache_dtype {est.kv_cache_dtype})",
        f"  blocks                  {est.num_gpu_blocks:>9,}      (block size {est.block_size})",
        f"  KV cache tokens         {est.kv_cache_tokens:>9,}",
        f"  max concurrency         {est.max_concurrency:9.2f}x     at max_model_len {est.max_model_len:,}",
        f"  largest max_model_len   {est.max_model_len_fits:>9,}      ({'fits' if est.fits else 'does NOT fit'})",
    ]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)

