"""Builds the cffi extension of the cachefiles backend (c_ext/) when afsd is installed; all other metadata is
in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["c_ext/build_cachefiles.py:ffibuilder"])
