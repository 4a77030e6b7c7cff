"""Each bad input or fault of `tests/bad_inputs.py` is handled: a named error, or a right result."""
import pytest

from bad_inputs import CASES


@pytest.mark.parametrize("name,what,fn", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_handled(name, what, fn, tmp_path):
    shown = fn(tmp_path)
    assert isinstance(shown, str) and shown
