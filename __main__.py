"""`python -m latentloom` is the same as the `latentloom` command."""
from latentloom.cli import main

raise SystemExit(main())
