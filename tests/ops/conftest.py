"""The built kernel library for the tests of our C++ CPU kernels (dsla/ops/csrc)."""

from __future__ import annotations

import pytest

from dsla.ops import cpu_kernels

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None,
                                    reason="no C++ compiler: the kernels cannot be built here (torch's ops serve)")


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernels.cpu_kernels_lib()
    assert lib is not None, "the kernels did not build on a machine with a C++ compiler"
    return lib
