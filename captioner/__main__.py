"""`python -m captioner` runs the CLI."""

from captioner.cli import main

raise SystemExit(main())
