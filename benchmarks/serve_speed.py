"""Speed of `memfit serve`: one call in-process (after the model is loaded) and the command from a cold shell
(target <= 0.1 s over the bare interpreter's start-up), and that no torch is imported.
Run: python benchmarks/serve_speed.py"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit.models import load_model  # noqa: E402
from memfit.serve import serve  # noqa: E402


def in_process(model: str, n: int = 200, **kw) -> float:
    spec = load_model(model)
    serve(spec, **kw)
    t = time.perf_counter()
    for _ in range(n):
        serve(spec, **kw)
    return (time.perf_counter() - t) / n * 1e3


def cold(cmd: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


if __name__ == "__main__":
    for model, kw in (("llama-3.1-8b", {"gpu": "h100-80gb"}),
                      ("gemma-3-27b", {"gpu": "h100-80gb", "max_model_len": 32768}),
                      ("deepseek-v3", {"gpu": "h200", "tensor_parallel": 8}),
                      ("llama-3.1-70b", {"gpu": "h100-80gb", "tensor_parallel": 4, "engine": "sglang"})):
        print(f"serve in-process  {model:14s} {in_process(model, **kw):7.2f} ms/call")
    bare = cold([sys.executable, "-c", "pass"])
    src = str(Path(__file__).resolve().parents[1] / "src")
    full = cold([sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); from memfit.cli import main; "
                 "sys.exit(main(['serve', 'llama-3.1-8b', '--gpu', 'h100-80gb', '--json']))"])
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); "
                            "from memfit.serve import serve; serve('llama-3.1-8b', gpu='h100-80gb'); "
                            "print('torch' in sys.modules)"], capture_output=True, text=True).stdout.strip()
    print(f"memfit serve, cold shell {full:6.3f} s; bare python {bare:6.3f} s; memfit's share {full - bare:6.3f} s "
          f"(target <= 0.1 s); torch imported: {probe}")
