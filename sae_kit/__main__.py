"""`python -m sae_kit COMMAND ...`: the `sae-kit` command, also as a module, which is how torchrun launches it:
`torchrun --nproc-per-node N -m sae_kit train ...` (data parallel; see docs/distributed.md)."""

import sys

from sae_kit.cli import main

if __name__ == "__main__":
    sys.exit(main())
