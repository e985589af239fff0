"""Fuzz suite: every generated input ends in a result or a documented MemfitError, never a traceback.

The generators are in ``tests/fuzz_inputs.py`` (shared with ``validation/fuzz_report.py``, which counts the
escapes per class). hypothesis draws the seed of each input, derandomized, so CI sees the same 20,500
inputs on every run; a failure prints the input that broke. Most inputs go through the Python API,
about a twentieth through ``memfit.cli.main`` in process, and a handful through a real subprocess to prove
"one line on stderr, exit 2, no traceback".

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
