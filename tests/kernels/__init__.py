"""Kernel tests (a package so this folder's conftest.py does not replace the module
``conftest`` that other test folders import from tests/conftest.py)."""
