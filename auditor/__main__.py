"""``python -m auditor`` runs the CLI."""

from .cli import main

main()
