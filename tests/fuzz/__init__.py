"""Fuzz targets: hypothesis properties of berth's servers.

Each module defines its properties once. The suite runs them bounded
(``tests/unit/test_fuzz_*.py``, the ``suite`` profile: derandomized, no database, a few
seconds each); ``python -m tests.fuzz.<module> --hours H`` runs them for hours with
random seeds and prints what it finds.
"""
