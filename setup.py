"""Builds the cffi extensions of the cachefiles and fanotify backends (c_ext/) when afsd is installed; all other metadata is
in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["c_ext/build_cachefiles.py:ffibuilder", "c_ext/build_fanotify.py:ffibuilder"])
