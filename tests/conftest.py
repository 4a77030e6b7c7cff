"""Fixtures for unit tests: tiny random-weight BLIP / Stable Diffusion checkpoints on disk.

Built once per session (a few seconds each) so several tests can load them with the real
`from_pretrained` code paths; see tests/tiny_models.py for why they exist.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    """Folder holding a tiny `BlipForConditionalGeneration` + `BlipProcessor`."""
    pytest.importorskip("transformers")
    from tiny_models import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """Folder holding a tiny `StableDiffusionPipeline` with a DPM-Solver++ scheduler."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from tiny_models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def isolated_concepts(monkeypatch, tmp_path):
    """No test reads the user's concept cache or concept dir, and none touches the network."""
    from nd_utils import paper_concept_files

    monkeypatch.setenv("ND_CONCEPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ND_CONCEPT_DIR", raising=False)

    def no_network(*a, **k):
        raise AssertionError("test tried to use the network")
    monkeypatch.setattr(paper_concept_files, "urlopen", no_network)
