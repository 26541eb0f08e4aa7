"""`python -m latentloom.training ARGS` is `latentloom train ARGS` (so `accelerate launch -m latentloom.training` works)."""
from latentloom.training.cli_train import main

raise SystemExit(main())
