"""Test session set-up shared by unit tests and nbval notebook runs.

Everything a test session writes goes to one temporary artifact store (ND_DATA_DIR), so tests
never touch the repository's data/ folder. Notebook kernels inherit the variable.
"""
import os
import tempfile
from pathlib import Path

if "ND_DATA_DIR" not in os.environ:
    os.environ["ND_DATA_DIR"] = tempfile.mkdtemp(prefix="nd-test-data-")
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED = Path(os.environ.get("ND_SHARED_DIR", Path(__file__).resolve().parent.parent / "shared"))
