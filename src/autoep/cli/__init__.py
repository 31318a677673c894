"""The ``autoep`` command line."""
