"""Run the fuzz generators with no safety net and count what escapes, by class.

Every input of ``tests/fuzz_inputs.py`` is fed to memfit; an outcome is clean when it is a result or a
:class:`memfit.errors.MemfitError` (for the CLI: exit 0, or a non-zero exit with one stderr line and no
traceback). Everything else - any other exception, a CLI traceback, an input that takes longer than
``--time-limit`` seconds - is classified by exception type and the innermost memfit frame it came from, and
counted. Deterministic: input ``i`` of a surface comes from ``random.Random(f"{surface}:{seed}:{i}")``.

    PYTHONPATH=src python validation/fuzz_report.py            # 22,000 inputs, counts per class
    PYTHONPATH=src python validation/fuzz_report.py -n 2000 --examples 2

Memory is capped (``RLIMIT_AS``, default 4 GiB) so an input that asks for 2**31 layers fails as a
MemoryError instead of swapping the machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


class _Slow(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Slow()


def _where(exc: BaseException) -> str:
    """file:function of the innermost frame inside memfit (or the innermost frame at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "/memfit/" in f.filename]
    f = (inside or frames or [None])[-1]
    if f is None:
        return "?"
    return f"{Path(f.filename).name}:{f.name}"


def _short(obj) -> str:
    try:
        return repr(obj)[:300]
    except RecursionError:
        return "<nested too deep to show>"
    except ValueError:  # an int of more than 4300 digits has no repr
        sys.set_int_max_str_digits(0)
        try:
            return repr(obj)[:300]
        finally:
            sys.set_int_max_str_digits(4300)


def classify(surface: str, run) -> str | None:
    """None for a clean outcome, else a class name."""
    from fuzz_inputs import cli_output_ok

    from memfit.errors import MemfitError

    try:
        result = run()
    except MemfitError:
        return None
    except _Slow:
        return f"{surface}: slower than the time limit"
    except RecursionError as exc:
        return f"{surface}: RecursionError at {_where(exc)}"
    except BaseException as exc:  # noqa: BLE001 - counting is the point
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"{surface}: {type(exc).__name__} at {_where(exc)}"
    if isinstance(result, tuple) and result and result[0] == "cli":
        bad = cli_output_ok(result)
        if bad:
            err = result[3]
            last = [ln for ln in err.strip().splitlines() if ln.strip()]
            kind = last[-1].split(":")[0] if last else "?"
            return f"{surface}: {bad} ({kind})"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=22_000, help="inputs in all (split by the surfaces' shares)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=5.0, help="seconds one input may take")
    ap.add_argument("--memory-gib", type=float, default=4.0)
    ap.add_argument("--examples", type=int, default=1, help="inputs to show per class")
    args = ap.parse_args(argv)

    cap = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    import fuzz_inputs

    signal.signal(signal.SIGALRM, _alarm)
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, list] = collections.defaultdict(list)
    per_surface: collections.Counter[str] = collections.Counter()
    t0 = time.perf_counter()
    total = 0
    for surface, (gen, share) in fuzz_inputs.SURFACES.items():
        n = max(1, round(args.n * share))
        for i in range(n):
            rnd = random.Random(f"{surface}:{args.seed}:{i}")
            run = gen(rnd)
            signal.setitimer(signal.ITIMER_REAL, args.time_limit)
            try:
                cls = classify(surface, run)
            except _Slow:
                cls = f"{surface}: slower than the time limit"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            total += 1
            per_surface[surface] += 1
            if cls:
                counts[cls] += 1
                if len(examples[cls]) < args.examples:
                    examples[cls].append(_short(getattr(run, "input", None)))
    dt = time.perf_counter() - t0
    bad = sum(counts.values())
    print(f"{total} inputs in {dt:.1f} s ({', '.join(f'{s} {n}' for s, n in per_surface.items())})")
    print(f"{bad} escaped as something other than a MemfitError, in {len(counts)} classes")
    for cls, n in counts.most_common():
        print(f"{n:6d}  {cls}")
        for ex in examples[cls]:
            print(f"          e.g. {ex}")
    for p in fuzz_inputs._tmp:
        import shutil

        shutil.rmtree(p, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
