"""CLI commands, one module each, registered in ``compressor/cli.py`` with one line."""
