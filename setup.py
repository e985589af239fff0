"""Build settings pyproject.toml cannot hold: the estimator's optional compiled parts.

- ``memfit.allocator._replay`` (src/memfit/allocator/_replay.c): the allocator model's replay of an event
  stream (default setting and expandable segments), 10-40 times faster than the Python model;
- ``memfit.estimator._events`` (src/memfit/estimator/_events.c): the copy of a layer's stretch of the stream
  for the next identical layer.

Both are optional: where no C compiler is found the build goes on without them and memfit runs their Python
versions (the same answers, slower; tests compare the two)."""

import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(name, [src], optional=True, extra_compile_args=["-O2"] + (["-pthread"] if name.endswith("_replay") and sys.platform != "win32" else []),
                             extra_link_args=["-pthread"] if name.endswith("_replay") and sys.platform != "win32" else [])
                   for name, src in (("memfit.allocator._replay", "src/memfit/allocator/_replay.c"),
                                     ("memfit.estimator._events", "src/memfit/estimator/_events.c"))])
