"""The tools built on the engine: trace readers and writers, replay, conformance runs
against ``/dev/kvm``, stress checking, benchmarks and the ``memslots`` command line.

Nothing below this package (the engine modules of :mod:`memslots`, the array baseline and
:mod:`memslots.kvm`) imports from it.
"""
