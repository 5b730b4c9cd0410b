"""The ``kappatune`` command line: one module per sub-command (``add_parser`` + ``run``)."""
