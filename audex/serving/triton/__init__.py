"""Audex on Triton: repositories, the one python model and its handlers, the worker, the launcher (see
:mod:`audex.serving`). Importing this package is cheap: the python model imports it inside the stub."""
