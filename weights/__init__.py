"""The bundled default model(s), shipped as package data (safetensors + JSON configs)."""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
