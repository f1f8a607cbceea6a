"""Docstrings are the API reference: every public name says what it does, its arguments, what it
raises, and shows an example."""

from __future__ import annotations

import inspect

import pytest

import flashtune_compile as ft

CALLABLES = [name for name in ft.__all__ if callable(getattr(ft, name))]
CONSTANTS = [name for name in ft.__all__ if not callable(getattr(ft, name))]


def _parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("name", CALLABLES)
def test_every_public_callable_documents_itself(name):
    obj = getattr(ft, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) >= 3, f"ft.{name}: no docstring to speak of"
    assert "Example" in doc, f"ft.{name}: no example"
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        assert "Raised by" in doc, f"ft.{name}: does not say what raises it"
        return
    assert "Raises:" in doc, f"ft.{name}: does not say what it raises"
    params = _parameters(obj)
    if params:
        assert "Args:" in doc, f"ft.{name}: no Args section"
        missing = [p for p in params if f"{p}:" not in doc]
        assert not missing, f"ft.{name}: arguments not described: {missing}"


def test_the_constants_are_described_in_the_package_docstring():
    for name in CONSTANTS:
        assert f"``{name}``" in ft.__doc__, name
