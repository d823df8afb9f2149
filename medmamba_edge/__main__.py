"""``python -m medmamba_edge``: the ``medmamba-edge`` command."""

from medmamba_edge.cli import main

main()
