"""Run every benchmark (``make bench``). Results go to ``--out`` as JSON and markdown."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import analysis_cost  # noqa: E402
import calibration  # noqa: E402
import overhead  # noqa: E402
import prune_effect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    analysis_cost.main(["--out", args.out])
    calibration.main(["--out", args.out, "--quiet"])
    prune_effect.main(["--out", args.out])
    overhead.main(["--out", args.out])


if __name__ == "__main__":
    main()
