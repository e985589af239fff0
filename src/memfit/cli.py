"""memfit's command line: parse, call the library, render. No torch is imported here."""

from __future__ import annotations

import argparse
import sys

from .errors import MemfitError, brief

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

# Job fields settable from flags: flag name -> (type, help)
_JOB_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "task": (str, "train or infer"),
    "method": (str, "full, lora or qlora"),
    "lora_rank": (int, "LoRA rank"),
    "lora_alpha": (int, "LoRA alpha"),
    "lora_targets": (str, "all-linear or a comma-separated list of module names (q_proj,v_proj)"),
    "precision": (str, "32-true, 16-mixed, bf16-mixed, bf16-true, 16-true"),
    "optimizer": (str, "adamw, adam, sgd, sgd-momentum, adafactor, lion, adamw-8bit, paged-adamw-8bit, paged-adamw"),
    "batch_size": (int, "micro-batch per GPU"),
    "seq_len": (int, "training sequence length"),
    "attention": (str, "sdpa, eager or flash"),
    "prompt_len": (int, "inference prompt length"),
    "new_tokens": (int, "inference tokens to generate (0: one forward over the prompt)"),
    "kv_cache_dtype": (str, "auto, fp32, fp16, bf16, fp8"),
    "quantization": (str, "none, int8, nf4, fp4, fp8, gptq, awq"),
    "quant_group_size": (int, "quantization block/group size"),
    "gpus": (int, "total GPUs"),
    "gpus_per_node": (int, "GPUs per node"),
    "strategy": (str, "single, ddp, fsdp, fsdp2, zero1, zero2, zero3"),
    "offload": (str, "none, optimizer, optimizer+params"),
    "offload_device": (str, "cpu or nvme (ZeRO-Infinity)"),
    "fsdp_sharding": (str, "fsdp: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD"),
    "bucket_cap_mb": (int, "ddp: DistributedDataParallel bucket_cap_mb (default 25)"),
    "reduce_bucket_size": (int, "ZeRO reduce_bucket_size, elements (default 5e8)"),
    "allgather_bucket_size": (int, "ZeRO-1/2 allgather_bucket_size, elements (default 5e8)"),
    "sub_group_size": (int, "ZeRO-3 sub_group_size, elements (default 1e9)"),
    "stage3_prefetch_bucket_size": (int, "ZeRO-3 prefetch, elements (default 5e7)"),
    "stage3_param_persistence_threshold": (int, "ZeRO-3 persistence threshold, elements (default 1e5)"),
    "stage3_max_live_parameters": (int, "ZeRO-3 live parameters, elements (default 1e9)"),
    "stage3_max_reuse_distance": (int, "ZeRO-3 reuse distance, elements (default 1e9)"),
    "tensor_parallel": (int, "Megatron tensor-parallel degree"),
    "pipeline_parallel": (int, "pipeline stages"),
    "pipeline_microbatches": (int, "micro-batches in flight on the first stage (default: pipeline_parallel)"),
    "expert_parallel": (int, "MoE expert-parallel degree"),
}
_JOB_BOOLS = ("gradient_checkpointing", "double_quant", "reshard_after_forward", "gradient_as_bucket_view",
              "sequence_parallel", "overlap_comm", "contiguous_gradients", "expandable_segments")


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The model positional, ``--job FILE`` and one flag per job field."""
    p.add_argument("model", nargs="?", help="registry name (memfit models), config.json path, or Hub id")
    p.add_argument("--job", metavar="FILE", help="YAML/JSON job file (flags override its fields)")
    for name, (typ, help_) in _JOB_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    for name in _JOB_BOOLS:
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)


def add_job_command(sub: Any, name: str, run: Callable[[argparse.Namespace], int], *, help: str,
                    description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand that takes a job (:func:`add_job_arguments`) and runs ``run``; the caller adds its own
    flags to the parser returned."""
    p = sub.add_parser(name, help=help, description=description)
    add_job_arguments(p)
    p.set_defaults(func=run)
    return p


def add_card_arguments(p: argparse.ArgumentParser, gpu_memory_help: str) -> None:
    """``--gpu NAME`` (a card from ``memfit gpus``) or ``--gpu-memory SIZE`` (24GiB, 16GB)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", metavar="NAME", default=None, help="a card from `memfit gpus` (e.g. rtx-4090, a100-80gb)")
    g.add_argument("--gpu-memory", metavar="SIZE", dest="gpu_memory", default=None, help=gpu_memory_help)


def card_from_args(args: argparse.Namespace) -> int | None:
    """The card's memory in bytes from ``--gpu`` / ``--gpu-memory`` (None when neither is given)."""
    if getattr(args, "gpu", None):
        from .gpus import get_gpu

        return get_gpu(args.gpu).memory_bytes
    if getattr(args, "gpu_memory", None) is not None:
        from .units import parse_card_memory

        return parse_card_memory(args.gpu_memory)
    return None


def job_from_args(args: argparse.Namespace):
    """Build a :class:`~memfit.job.Job` from ``--job`` and flags."""
    from .job import Job, load_job

    data: dict[str, Any] = {}
    if args.job:
        data = load_job(args.job).to_dict()
    # engine configs (estimate --deepspeed / --accelerate-config): their fields, then the flags on top (the
    # readers imported only when a file is named: a plain estimate starts without them)
    for attr, reader in (("accelerate_config", "read_accelerate_config"), ("deepspeed", "read_deepspeed_config")):
        path = getattr(args, attr, None)
        if path:
            from . import deepspeed_config

            data.update(getattr(deepspeed_config, reader)(path))
    if args.model:
        data["model"] = args.model
    for name in list(_JOB_FLAGS) + list(_JOB_BOOLS):
        v = getattr(args, name, None)
        if v is not None:
            data[name] = v
    if "model" not in data:
        raise MemfitError("name a model (memfit models lists the built-in ones) or pass --job FILE")
    job = Job.from_dict(data)
    # printed by main() once the command has answered (an error stays the one line on stderr)
    args.warnings = flag_warnings(args, job, engine_config=any(getattr(args, a, None)
                                                               for a in ("deepspeed", "accelerate_config")))
    return job


#: Flags that only mean something for one task: flag -> the task it applies to.
_TASK_FLAGS = {"seq_len": "train", "gradient_checkpointing": "train", "optimizer": "train",
               "prompt_len": "infer", "new_tokens": "infer", "kv_cache_dtype": "infer"}


def flag_warnings(args: argparse.Namespace, job: Any, *, engine_config: bool = False) -> list[str]:
    """What the user asked for on the command line that this job will not use (one line each)."""
    out = []
    for name, task in _TASK_FLAGS.items():
        if getattr(args, name, None) is not None and job.task != task:
            flag = "--" + name.replace("_", "-")
            out.append(f"{flag} applies to {'training' if task == 'train' else 'inference'} only; "
                       f"ignored for task {job.task}")
    if engine_config and getattr(args, "gpus", None) is None and job.gpus == 1:
        out.append("the engine config does not say how many GPUs (a DeepSpeed config never does): "
                   "estimating 1 GPU; pass --gpus N")
    return out


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = list_models()
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(rows)} built-in models", box=None)
    for col in ("name", "family", "parameters", "hf id"):
        t.add_column(col, justify="right" if col == "parameters" else "left")
    for r in rows:
        t.add_row(r["name"], r["model_type"], f"{r['parameters'] / 1e9:.3f} B", r.get("hf_id", ""))
    Console().print(t)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser, built without asking the terminal for its size, whose errors are one line.

    ``add_argument`` makes a help formatter to check each flag's metavar (``HelpFormatter._format_args``, which
    does not read the width), and a formatter made without a width imports shutil and asks the terminal for its
    size: once per flag, some fifty times for a job command. While :func:`build_parser` runs, that check gets a
    formatter of a fixed width; help lines are formatted later, by argparse's own formatter at the terminal's
    width, so they read as before. Subcommand parsers are of this class too (argparse makes them of the parent
    parser's class), so what follows holds for every command:

    - a usage error (a bad type or choice, a missing value, an unknown flag) is one line on stderr,
      ``memfit: error: <what argparse says> (see memfit CMD --help)``, and exit 2, not the usage block;
    - a flag's or positional's text value may not be empty or blank (``--host ''`` would bind every
      interface, ``--gpu ''`` read as no card, ``--job ''`` as no file)."""

    _building = False
    #: the command whose help the error line points at (set by :func:`main`: an unknown flag after the
    #: command is reported by the top parser, whose own prog is plain ``memfit``)
    help_prog: str | None = None

    def _get_formatter(self):
        if _Parser._building:
            return self.formatter_class(prog=self.prog, width=80)
        return super()._get_formatter()

    def _get_value(self, action, arg_string):
        if (action.type is None or action.type is str) and not isinstance(action, argparse._SubParsersAction) \
                and isinstance(arg_string, str) and not arg_string.strip():
            raise argparse.ArgumentError(action, f"must not be empty or blank; got {arg_string!r}")
        return super()._get_value(action, arg_string)

    def error(self, message: str):  # noqa: D102 - argparse's hook; never returns
        line = " ".join(str(message).split())  # one line whatever argparse put together
        if len(line) > 400:  # argparse quotes the value whole: a pasted 5,000-digit number stays readable
            line = line[:397] + "..."
        self.exit(2, f"memfit: error: {line} (see {self.help_prog or self.prog} --help)\n")


#: Largest count a flag takes where nothing else bounds it (as :class:`memfit.job.Job`'s counts).
MAX_COUNT = (1 << 31) - 1


def whole(minimum: int = 1, maximum: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``minimum`` to ``maximum`` (outside, the parser's one-line
    error, worded as the job's own checks: ``must be a whole number >= 1; got 0``)."""

    def int_(text: str) -> int:
        n = int(text)  # a ValueError is argparse's "invalid int value: 'abc'"
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}; got {n}")
        if n > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}; got {brief(n)}")
        return n

    int_.__name__ = "int"
    return int_


def finite(text: str) -> float:
    """An argparse ``type``: a number that is not NaN or infinite."""
    v = float(text)  # a ValueError is argparse's "invalid float value: 'abc'"
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text.strip()!r}")
    return v


finite.__name__ = "float"


_COMMAND_MODULES = ("measure", "trace", "compare", "validate", "gpus", "plan", "serve", "web")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``only`` (a command's name) of that one alone: ``memfit estimate``
    then imports no other command's module (a cold start counts every module it loads)."""
    _Parser._building = True
    try:
        return _build_parser(only)
    finally:
        _Parser._building = False


def _build_parser(only: str | None) -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="memfit",
        description="How much GPU memory will this LLM job take, where does it go, and what would make it fit.")
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    # prog given: what argparse would format from the usage line (the parser has no positionals), without a formatter
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="memfit")

    if only in (None, "estimate"):
        from .commands import estimate as c_estimate

        c_estimate.add_parser(sub)

    if only in (None, "models"):
        p = sub.add_parser("models", help="list the built-in model registry")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_models)

    for mod in _COMMAND_MODULES:
        if only is not None and mod != only:
            continue
        try:
            module = __import__(f"memfit.commands.{mod}", fromlist=["add_parser"])
        except ImportError:  # a command not built yet
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    only = words[0] if words and words[0] in ("estimate", "models", *_COMMAND_MODULES) else None
    parser = build_parser(only)
    parser.help_prog = f"memfit {only}" if only else None
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # --help, --version (0) or a usage error, already one line on stderr (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        print(f"memfit: error: name a command ({', '.join(('estimate', 'models', *_COMMAND_MODULES))})",
              file=sys.stderr)
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at the interpreter's exit
    except MemfitError as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("memfit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `memfit ... | head`: the reader left; say nothing more, as other tools do
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush would raise again
        return 141
    for line in getattr(args, "warnings", ()):
        print(f"memfit: warning: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
