"""The ``>>>`` examples in the pure modules' docstrings run and print what they show."""

import doctest
import importlib

import pytest

from hetlora import methods

PURE = ["hetlora.lora", "hetlora.aggregation", "hetlora.methods",
        *(f"hetlora.methods.{name}" for name in methods.names())]


@pytest.mark.parametrize("name", PURE)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
