"""The research application on top of the srigl library: the ``srigl`` command line, training runs,
data sets, models, FLOP counting and reports (``pip install 'srigl[app]'``).

The library (everything outside this package) imports nothing from here; this package imports
the library like any user would.
"""
