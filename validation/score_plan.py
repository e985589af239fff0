"""Score the planning scenarios (the newest validation/records/*plan-scenarios*.json, or a path): in each scenario
the top-ranked candidate runs at its micro-batch (measured fits), and its measured tokens/s is within 10%
of the best measured among the top five. Usage: python validation/score_plan.py [RECORD]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "records"


def _newest() -> Path | None:
    """The planning-scenario record of the latest round (h200-plan-scenarios-N.json, the largest N)."""
    def rank(p: Path) -> int:
        tail = p.stem.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else 1
    found = sorted(RECORDS.glob("*plan-scenarios*.json"), key=rank)
    return found[-1] if found else None


def score(data: dict) -> list[dict]:
    """Per scenario: top runs?, its tokens/s over the best measured of the top five, pass."""
    rows = []
    for sc in data["scenarios"]:
        cands = sc["candidates"]
        if sc.get("skipped"):
            rows.append({"name": sc["name"], "complete": False, "top_runs": False, "ratio": None, "pass": None,
                         "ooms": []})
            continue
        ran = [c for c in cands if c["measured"].get("fits") and c["measured"].get("tokens_per_s")]
        top = cands[0] if cands else None
        top_ok = bool(top and top["measured"].get("fits") and top["measured"].get("tokens_per_s"))
        any_oom = [c["rank"] for c in cands if c["measured"].get("fits") is False]
        measured = [c for c in cands if c["measured"].get("status") in ("ok",) or "fits" in c["measured"]]
        if not top or top["measured"].get("status", "").startswith("skipped") or len(measured) < len(cands):
            rows.append({"name": sc["name"], "complete": False, "top_runs": top_ok, "ratio": None, "pass": None,
                         "ooms": any_oom})
            continue
        best = max(c["measured"]["tokens_per_s"] for c in ran) if ran else None
        ratio = top["measured"]["tokens_per_s"] / best if (top_ok and best) else 0.0
        rows.append({"name": sc["name"], "complete": True, "top_runs": top_ok, "ratio": ratio,
                     "pass": top_ok and ratio >= 0.90, "ooms": any_oom})
    return rows


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else _newest()
    if path is None or not path.is_file():
        print(f"score_plan: no planning-scenario record at {path or RECORDS / '*plan-scenarios*.json'}", file=sys.stderr)
        return 2
    print(f"record: {path.relative_to(RECORDS.parent.parent) if path.is_relative_to(RECORDS.parent.parent) else path}")
    rows = score(json.loads(path.read_text()))
    print(f"{'scenario':34s} {'top runs':>8s} {'top/best':>8s}  OOM among top five (ranks)")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['name']:34s} {str(r['top_runs']):>8s} {ratio:>8s}  {r['ooms'] or '-'}"
              + ("" if r["complete"] else "  (incomplete)"))
    done = [r for r in rows if r["complete"]]
    ok = len(done) >= 8 and all(r["pass"] for r in done)
    print(f"{sum(bool(r['pass']) for r in done)}/{len(done)} complete scenarios pass; bar (>= 8 complete, all pass):",
          "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
