"""The compiled paths are optional: a failed compile installs the pure-Python package.

Everything else about the build is in pyproject.toml, the C extensions
included ([[tool.setuptools.ext-modules]]). This file only changes how they
are built: all four or none. If one does not compile (no compiler, no
Python headers, an unsupported platform), the rest are not tried, the
build says so in one warning and goes on; the installed commlens then runs
its Python twins (tracer/implementation.py), which do the same thing.

``COMMLENS_PUREPYTHON=1`` at build time skips the compiler altogether and
builds the pure-Python package: its wheel is ``py3-none-any``, installable on
any Python >= 3.10 and any platform (scripts/build-dist builds it beside the
manylinux one). A failed compile is not that: its wheel stays tagged for the
platform it was built on, as any build that tried to compile.
"""

import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext


def _pure_python_wanted():
    return os.environ.get("COMMLENS_PUREPYTHON", "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext that leaves out the compiled paths, with one warning, when
    any of them fails to build."""

    def run(self):
        if _pure_python_wanted():
            self._skip("COMMLENS_PUREPYTHON is set")
            return
        try:
            super().run()
        except Exception as exc:  # the compiler's errors and a missing compiler alike
            self._skip(f"{type(exc).__name__}: {exc}")

    def build_extensions(self):
        # One by one, stopping at the first failure: a partial build would
        # run Python anyway (tracer/implementation.py uses all four or none).
        self.check_extensions_list(self.extensions)
        for extension in self.extensions:
            self.build_extension(extension)

    def _skip(self, why):
        # What did build before the failure is not installed either.
        for extension in self.extensions:
            built = self.get_ext_fullpath(extension.name)
            if os.path.exists(built):
                os.remove(built)
        self.extensions = []
        sys.stderr.write(
            "WARNING: commlens: the compiled paths were not built (%s); installing the "
            "pure-Python package, which does the same thing more slowly.\n" % why)


class CommlensDistribution(Distribution):
    """A distribution that has no compiled modules when the pure-Python
    package is wanted, so the wheel is tagged py3-none-any (bdist_wheel asks
    has_ext_modules()) and build_ext is not run at all."""

    def has_ext_modules(self):
        return not _pure_python_wanted() and super().has_ext_modules()


setup(cmdclass={"build_ext": OptionalBuildExt}, distclass=CommlensDistribution)
