"""Run every benchmark (``make bench``). Results go to ``--out`` as JSON, markdown and PNG plots.

The calibration benchmark dominates (about 40 minutes on 2 cores for its five models at these
sizes); the static-pruning benchmark takes about 10 minutes, the wall-clock one about 10, the
site-kernel grid about 1."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import analysis_cost  # noqa: E402
import calibration  # noqa: E402
import overhead  # noqa: E402
import prune_effect  # noqa: E402
import site_kernels  # noqa: E402
import static_pruning  # noqa: E402
import wallclock  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    analysis_cost.main(["--out", args.out])
    calibration.main(["--out", args.out, "--quiet", "--val", "1000", "--test", "2000"])
    static_pruning.main(["--out", args.out])
    prune_effect.main(["--out", args.out])
    overhead.main(["--out", args.out])
    site_kernels.main(["--out", args.out])
    wallclock.main(["--out", args.out])


if __name__ == "__main__":
    main()
