"""The examples in the docstrings of the pure modules run, and give what they show."""
from __future__ import annotations

import doctest
import importlib

import pytest

# modules whose examples need no model weights, network or artifact store
PURE = ["stage_cache", "stages", "errors", "registry", "machine", "hooks", "similarity", "similarity_blocks",
        "similarity_formulas",
        "cosines", "tensor_stream", "imagenet_sample", "scoring", "notices", "config_values",
        "context", "label_metrics", "probe_split", "config", "stages.evaluation",
        "stages.evaluation_metrics", "concept_sets", "concept_text",
        "trust_metrics", "stages.trust_scoring", "viz.trust_plots", "run_faults", "plugins"]


@pytest.mark.parametrize("name", PURE)
def test_docstring_examples(name):
    module = importlib.import_module(f"nd_utils.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.attempted > 0, f"nd_utils.{name} has no runnable example"
    assert result.failed == 0, f"{result.failed} example(s) of nd_utils.{name} failed (see above)"
