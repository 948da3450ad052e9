"""The ``ggflat`` command line."""
