"""Compare the estimator's per-layer saved bytes with the GPU probe (validation/probes/layer_probe.json).

usage: python validation/probes/check_layers.py [PROBE_JSON]
"""
import json
import sys
from pathlib import Path

from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import layer_probe as lp  # noqa: E402
from memfit.estimator.layers import Mode, _replay_layer  # noqa: E402
from memfit.estimator.states import linear_weight_params  # noqa: E402
from memfit.models.families import spec_from_config  # noqa: E402

PREC = {"bf16-true": "true", "bf16-mixed": "mixed", "32-true": "32"}


def main(path):
    data = json.load(open(path))
    runs = {(r["family"], r["layers"], r["precision"], r["attn"], r["ckpt"], r.get("opt", "adamw"), r.get("vocab")): r
            for r in data["runs"] if "error" not in r}
    rows = []
    for (fam, L, prec, attn, ck, opt, V), r4 in runs.items():
        if L != 4 or opt != "adamw" or V != 32000:
            continue
        r2 = runs.get((fam, 2, prec, attn, ck, opt, V))
        if not r2:
            continue
        T = r4["B"] * r4["S"]
        meas = (r4["fwd_end"] - r4["start"] - (r2["fwd_end"] - r2["start"])) / 2 / T
        kw = dict(lp.FAMILIES[fam]); kw[lp.LAYER_KEY.get(fam, "num_hidden_layers")] = 4
        cfg = AutoConfig.for_model(fam, **kw).to_dict()
        cfg["architectures"] = None
        try:
            spec = spec_from_config(cfg, name=fam)
        except Exception as exc:  # noqa: BLE001
            print(fam, "spec failed:", exc)
            continue
        mode = Mode(precision=PREC[prec], trainable_base=True, lora_targets=frozenset(), lora_rank=8,
                    attention=r4.get("attn_impl", attn) if attn != "sdpa" else ("eager" if r4.get("attn_impl") == "eager" else "sdpa"),
                    seq_len=r4["S"], dropout=float(cfg.get("resid_pdrop") or cfg.get("hidden_dropout") or cfg.get("dropout") or 0.0) if isinstance(cfg.get("resid_pdrop") or cfg.get("hidden_dropout") or cfg.get("dropout") or 0.0, (int, float)) else 0.0)
        if ck:
            est = spec.hidden_size * (2 if prec == "bf16-true" else 4)
        else:
            blk = spec.blocks[-1]
            est = _replay_layer(spec, blk, mode)
            if prec == "bf16-mixed":
                est += 2 * sum(l.in_features * l.out_features * l.count for l in blk.linears) / T
        rows.append((fam, prec, attn, ck, meas, est, (est - meas) / meas * 100))
    for row in sorted(rows):
        print(f"{row[0]:12s} {row[1]:10s} {row[2]:5s} ck{int(row[3])} measured {row[4]:9.0f} B/token/layer  estimate {row[5]:9.0f}  err {row[6]:+6.1f}%")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "layer_probe.json"))
