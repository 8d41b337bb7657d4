"""Build entry for scidiff.

The Python package is plain setuptools; native code (the streaming h5ad reader in csrc/) is
described once, in CMakeLists.txt, and built through scikit-build-core's setuptools plugin.
"""
from setuptools import find_packages, setup

setup(
    # the Triton kernels live at the top level (kernels/) and install inside the package
    packages=find_packages(include=["scidiff", "scidiff.*"]) + ["scidiff.kernels"],
    package_dir={"scidiff.kernels": "kernels"},
    package_data={"scidiff": ["configs/*.yaml"]},
    cmake_source_dir=".",
)
