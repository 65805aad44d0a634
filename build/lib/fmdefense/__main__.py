"""`python -m fmdefense` runs the CLI."""

from fmdefense.cli import main

raise SystemExit(main())
