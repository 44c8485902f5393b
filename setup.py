"""The build is declared in pyproject.toml; this file stays for tools that still look for it."""
from setuptools import setup

setup()
