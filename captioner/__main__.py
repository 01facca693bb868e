"""`python -m captioner` runs the CLI."""

from .cli import main

raise SystemExit(main())
