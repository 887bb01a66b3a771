"""``python -m emovec ...`` runs the command line (torchrun launches sweeps this way)."""

from emovec.cli import main

main()
