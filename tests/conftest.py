"""Test-wide settings: never touch the network, keep CPU threads predictable."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Shared builders of tiny models live in tests/builders.py; make it importable from tests.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
