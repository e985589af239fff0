"""Writes a list of card/job pairs for validation/run_boundaries.py (the make_boundaries_*.py scripts' shared part):
each pair with ``start`` = memfit's max_batch_size on its card when the list is written (both address orders;
``# one order: N`` where the one-order rule answers otherwise), ``holdout: true``, ``needs`` where given and the
longer timeout of inference pairs."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def write_boundary_list(pairs, header: list[str], path) -> None:
    """``pairs``: (name, job fields, card such as "24GiB", needs or None); ``header``: the comment lines."""
    import memfit.estimator as est
    from memfit.checks import check_job_for_model
    from memfit.estimator import max_batch_size
    from memfit.job import Job
    from memfit.models import load_model
    from memfit.units import parse_card_memory

    out = list(header)
    for name, job, card, needs in pairs:
        j = Job(model=job["model"], **{k: v for k, v in job.items() if k != "model"})
        spec = load_model(j.model)
        check_job_for_model(j, spec)
        mem = parse_card_memory(card)
        b = max_batch_size(j, mem, spec=spec)
        est.TRAINING_BOTH_ORDERS = False
        try:
            b1 = max_batch_size(j, mem, spec=spec)
        finally:
            est.TRAINING_BOTH_ORDERS = True
        out.append(f"- name: {name}" + (f"  # one order: {b1}" if b1 != b else ""))
        out += [f"  gpu_memory: {card}", f"  start: {b}", "  holdout: true"]
        if needs:
            out.append(f"  needs: {needs}")
        if j.task == "infer":
            out.append("  timeout: 220")
        out.append("  job:")
        for k, v in job.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, list):
                v = "[" + ", ".join(v) + "]"
            out.append(f"    {k}: {v}")
        print(name, b, b1, file=sys.stderr)
    Path(path).write_text("\n".join(out) + "\n")
