"""`python -m ctxpatch.tune ...` = `ctxpatch tune ...` (what torchrun runs: `torchrun --nproc_per_node 2 -m ctxpatch.tune ...`)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
