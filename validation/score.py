"""Score memfit's estimate (or trace) against the measured records in validation/records.

usage: python validation/score.py [--engine estimate|trace] [--check] [--calibrate]
Same as `memfit validate`; CI runs it with --check so a change that breaks accuracy cannot land.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = [str(Path(__file__).resolve().parent / "records")] + args
    sys.exit(main(["validate", *args]))
