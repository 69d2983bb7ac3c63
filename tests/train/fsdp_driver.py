"""Runs several `python -m natsl.train` command lines in one torchrun launch (a launch costs ~15 s on CI's CPUs).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/fsdp_driver.py JOBS.json RCS.json

`JOBS.json` is a list of argument lists; rank 0 writes their exit codes to `RCS.json`.
"""

import json
import os
import sys

from natsl.train.cli import train_main


def main() -> int:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    rcs = []
    for argv in jobs:
        try:
            rc = train_main(argv)
        except SystemExit as e:  # argument errors (parser.error)
            rc = e.code
        rcs.append(rc)
    if os.environ.get("RANK", "0") == "0":
        with open(sys.argv[2], "w") as f:
            json.dump(rcs, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
