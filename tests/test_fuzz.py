"""Fuzz suite: every generated input ends in a result or a documented MemfitError, never a traceback.

The generators are in ``tests/fuzz_inputs.py`` (shared with ``validation/fuzz_report.py``, which counts the
escapes per class). hypothesis draws the seed of each input, derandomized, so CI sees the same 20,500
inputs on every run; a failure prints the input that broke. Most inputs go through the Python API,
about a twentieth through ``memfit.cli.main`` in process, and a handful through a real subprocess to prove
"one line on stderr, exit 2, no traceback".

Besides the random inputs, every argument of every command that takes a value, read from the parsers
themselves (a flag added tomorrow is covered), is given each malformed value of its kind, and every
numeric one each value at the edges (``fuzz_inputs.malformed_cases`` / ``extreme_cases``): a usage error
is one line on stderr like a job error, and no number makes a command hang.

Tolerance: none. One escape fails the test. The suite runs in about a minute on two cores; the profile
``MEMFIT_FUZZ_SCALE`` (an integer, default 1) multiplies the example counts for a longer local run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import fuzz_inputs  # noqa: E402

from memfit.breakdown import Breakdown  # noqa: E402
from memfit.errors import MemfitError  # noqa: E402

SCALE = int(os.environ.get("MEMFIT_FUZZ_SCALE", "1"))
#: inputs per surface in CI (20,500 in all). Since the estimate replays every job's allocation stream through
#: the caching-allocator model (tens of ms a job on 2 cores), the surfaces that run whole estimates get fewer
#: inputs and the parsing surfaces more; MEMFIT_FUZZ_SCALE restores depth locally.
EXAMPLES = {"job": 9400, "estimate": 1500, "max_batch_size": 100, "load_model": 2500, "config": 3000,
            "job_file": 1000, "engine_config": 2000, "cli": 1000}


def _settings(surface: str):
    return settings(max_examples=EXAMPLES[surface] * SCALE, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _outcome(surface: str, seed: int):
    run = fuzz_inputs.SURFACES[surface][0](random.Random(f"{surface}:{seed}"))
    try:
        result = run()
    except MemfitError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, f"MemfitError must be one line: {msg!r}"
        return exc
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{surface} input {getattr(run, 'input', None)!r:.400} raised {type(exc).__name__}: {exc!s:.300}")
    if isinstance(result, tuple) and result and result[0] == "cli":
        bad = fuzz_inputs.cli_output_ok(result)
        assert bad is None, f"CLI {getattr(run, 'input', None)!r:.400}: {bad}\n{result[3][-2000:]}"
    elif surface in ("estimate",):
        assert isinstance(result, Breakdown)
    return result


_seeds = st.integers(min_value=0, max_value=2**32 - 1)


@pytest.mark.parametrize("surface", list(EXAMPLES))
def test_no_traceback(surface):
    @_settings(surface)
    @given(_seeds)
    def check(seed):
        _outcome(surface, seed)

    check()


@pytest.mark.parametrize("argv, message", [
    (["estimate", "gpt2", "--job", "/etc/hostname.bin"], "job file"),
    (["estimate", "m" * 300], "unknown model"),
    (["estimate", "~nosuchuser/config.json"], "unknown model"),
    (["estimate", "gpt2", "--method", "lora", "--lora-rank", "99999999999999999999"], "lora_rank must be at most"),
    (["estimate", "gpt2", "--batch-size", "99999999999999999999"], "batch_size must be at most"),
    (["serve", "llama-3.1-8b", "--gpu", "h100-80gb", "--sampler", "sort"], "sampler must be native or flashinfer"),
    (["estimate", "llama-3.2-1b", "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["serve", "llama-3.2-1b", "--gpu-memory", "80"], "--gpu-memory 80 has no unit"),
    (["web", "--host", ""], "argument --host: must not be empty"),
])
def test_real_subprocess_is_one_line_exit_2(argv, message, tmp_path):
    """A real process: the first line of stderr is memfit's error, there is no second, the exit is 2."""
    if argv[-1].endswith(".bin"):
        p = tmp_path / "job.bin"
        p.write_bytes(bytes(range(256)))
        argv = argv[:-1] + [str(p)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "memfit.cli", *argv], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("memfit: error:") and message in lines[0], lines[0]


# ------------------------------------------------------------------------------------------- every flag
COMMANDS = sorted(fuzz_inputs.command_parsers())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_refuses_malformed_values_in_one_line(command):
    """Each argument that takes a value, with each malformed value of its kind (empty or blank text, words
    and fractions for counts, NaN and inf for floats, a choice not offered), each alias, the value left out,
    and an unknown flag: a non-zero exit, stderr one line starting with memfit that names the argument,
    no traceback."""
    from memfit.cli import build_parser

    base = fuzz_inputs.base_argv(command, fuzz_inputs.command_parsers()[command])
    build_parser(command).parse_args(base)  # the base is valid: each error below is the argument's own
    cases = fuzz_inputs.malformed_cases(command)
    bad = [f"memfit {' '.join(map(repr, argv))}: {problem}" for argv, names in cases
           if (problem := fuzz_inputs.one_line_error(fuzz_inputs.run_cli(argv, 30), names))]
    assert not bad, f"{len(bad)} of {len(cases)} cases:\n" + "\n".join(bad[:25])


# measure and trace run their engines (a model on the CPU, torch's fake tensors) on any job that validates
@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("measure", "trace")])
def test_numbers_at_the_edges_end_soon_and_cleanly(command):
    """Each numeric argument at -1, 0, 10**20 and 1e300: an answer (exit 0, or 1 with it on stdout) or the
    one-line error, within 30 s each (a global batch of 10**20 used to search for hours)."""
    cases = fuzz_inputs.extreme_cases(command)
    bad = [f"memfit {' '.join(map(repr, argv))}: {problem}" for argv in cases
           if (problem := fuzz_inputs.cli_output_ok(fuzz_inputs.run_cli(argv, 30)))]
    assert not bad, f"{len(bad)} of {len(cases)} cases:\n" + "\n".join(bad[:25])


@pytest.mark.parametrize("argv, message", [
    # argparse's errors: one line naming the argument and the command's help
    (["estimate", "llama-3.2-1b", "--batch-size", "abc"],
     "memfit: error: argument --batch-size: invalid int value: 'abc' (see memfit estimate --help)"),
    (["estimate", "gpt2", "--engine", "x"], "unrecognized arguments: --engine x (see memfit estimate --help)"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["serve"], "the following arguments are required: model (see memfit serve --help)"),
    (["estimate", "gpt2", "--gpu", "a100-80gb", "--gpu-memory", "24GiB"], "not allowed with argument --gpu"),
    # a card size needs its unit, in every command, and must be a GPU's
    (["serve", "llama-3.2-1b", "--gpu-memory", "80"], "--gpu-memory 80 has no unit; write 80GiB"),
    (["plan", "gpt2", "--gpu-memory", "80"], "--gpu-memory 80 has no unit"),
    (["serve", "llama-3.2-1b", "--gpu-memory", "80B"], "80B is 80 bytes, smaller than any GPU"),
    (["estimate", "gpt2", "--gpu-memory", "512KiB"], "smaller than any GPU"),
    (["estimate", "gpt2", "--gpu-memory", "99999999999999999999GiB"], "more than any GPU holds"),
    (["estimate", "gpt2", "--gpu-memory", "9" * 400 + "GiB"], "too large"),
    # empty or blank text is no value
    (["web", "--host", ""], "argument --host: must not be empty or blank"),
    (["web", "--host", "  "], "argument --host: must not be empty or blank"),
    (["estimate", "gpt2", "--gpu", ""], "argument --gpu: must not be empty"),
    (["estimate", ""], "argument model: must not be empty"),
    (["estimate", "gpt2", "--job", ""], "argument --job: must not be empty"),
    (["validate", ""], "argument records: must not be empty"),
    # impossible numbers
    (["plan", "gpt2", "--gpu", "h100-80gb", "--top", "0"], "argument --top: must be a whole number >= 1; got 0"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--top", "-3"], "argument --top: must be a whole number >= 1"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--global-batch", "99999999999999999999"],
     "argument --global-batch: must be at most 2,147,483,647"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--global-batch-tokens", "inf"], "--global-batch-tokens must be"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--global-batch-tokens", "-5"], "--global-batch-tokens must be"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--global-batch-tokens", "1e300"], "the most a plan takes"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--min-headroom", "nan"], "argument --min-headroom: must be a finite"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--min-headroom", "-1"], "must be a percent of the card"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--verify", "-1"], "argument --verify: must be a whole number >= 0"),
    (["plan", "gpt2", "--gpu", "h100-80gb", "--verify", "x"], "argument --verify"),
    (["estimate", "gpt2", "--batch-size", "-4"], "batch_size must be a whole number >= 1; got -4"),
    (["estimate", "gpt2", "--seq-len", "-1"], "seq_len must be a whole number >= 1"),
    (["measure", "gpt2", "--steps", "99999999"], "argument --steps: must be at most 10,000"),
    (["measure", "gpt2", "--limit", "0"], "argument --limit: must be a whole number >= 1"),
    (["web", "--port", "99999"], "argument --port: must be at most 65,535"),
    (["web", "--port", "0"], "argument --port: must be a whole number >= 1"),
    (["serve", "gpt2", "--gpu", "h100-80gb", "--gpu-memory-utilization", "nan"], "gpu_memory_utilization must be in"),
    (["serve", "gpt2", "--gpu", "h100-80gb", "--max-model-len", "99999999999999999999"], "max_model_len must be at most"),
    (["serve", "gpt2", "--gpu", "h100-80gb", "--dp", "99999999999999999999"], "data_parallel must be at most"),
    (["serve", "gpt2", "--gpu", "h100-80gb", "--requests", "-3", "--tokens", "10", "--fewest-gpus"],
     "requests must be a whole number >= 1; got -3"),
])
def test_bad_flag_values_are_one_line(argv, message):
    result = fuzz_inputs.run_cli(argv, 30)
    assert fuzz_inputs.one_line_error(result) is None, result
    assert result[1] == 2 and message in result[3], result[3]


def test_plan_refuses_a_top_or_global_batch_no_plan_has():
    """The library too: top 0 used to raise IndexError, a global batch of 10**20 to search for hours."""
    from memfit.job import Job
    from memfit.plan import plan

    job = Job.from_dict({"model": "gpt2"})
    for kw, message in ((dict(top=0), "top"), (dict(top=-1), "top"), (dict(global_batch=10**20), "at most"),
                        (dict(global_batch=0), "global_batch")):
        with pytest.raises(MemfitError, match=message):
            plan(job, "h100-80gb", **kw)


def test_web_says_in_one_line_when_it_cannot_listen():
    """A port in use (or a host this machine does not have) is memfit's error, not uvicorn's log line."""
    import socket

    from memfit.commands.web import check_can_listen

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MemfitError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_can_listen("127.0.0.1", port)
