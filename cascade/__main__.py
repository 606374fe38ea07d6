"""``python -m cascade`` is the ``cascade`` command."""

from cascade.cli import main

main()
