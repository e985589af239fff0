"""Run multi-GPU jobs one rank at a time on ONE GPU under PyTorch's fake process group (collectives skipped).

A check of the per-rank layout (sharded states, gathered layers, buckets) where no multi-GPU machine is lent;
NCCL's own buffers are not there, and the records say ``cuda-allocator-simulated`` so the scorer leaves them out.
usage: python validation/run_simulated.py validation/jobs/multi.yaml --out DIR --only NAME,... [--timeout 150]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=150)
    args = ap.parse_args()
    want = [n for n in args.only.split(",") if n]
    entries = [e for e in yaml.safe_load(Path(args.yaml).read_text()) if not want or e["name"] in want]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = []
    for e in entries:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "memfit.measurer.distributed", json.dumps(e["job"]), tmp,
                                "--simulate-rank", "0"], env=env, capture_output=True, text=True,
                               timeout=args.timeout)
            rec_path = Path(tmp) / "record.json"
            if p.returncode == 0 and rec_path.is_file():
                rec = json.loads(rec_path.read_text())
                rec.update(name=e["name"] + "-simulated-rank0", holdout=True, status="ok")
                b = rec["breakdown"]
                print(f"{e['name']:40s} ok  alloc {b['peak_allocated_bytes'] / 2**30:7.2f} GiB ({b['peak_phase']})"
                      f"  wall {time.time() - t0:.0f} s", flush=True)
            else:
                rec = {"name": e["name"], "job": e["job"], "status": "error", "stderr_tail": p.stderr[-2000:]}
                print(f"{e['name']:40s} error  {p.stderr.strip().splitlines()[-1][:150] if p.stderr.strip() else ''}",
                      flush=True)
            out.append(rec)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "records-simulated.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
