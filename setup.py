"""The one compiled part: tftpd's lock-step loop (tftpd/_lockstep.c; lockstep.py falls back to
pure Python without it). Everything else is in pyproject.toml.

    python3 setup.py build_ext --inplace    # what scripts/install-deps.sh and the RPM do
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tftpd._lockstep", ["tftpd/_lockstep.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
