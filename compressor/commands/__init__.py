"""``compress`` subcommands, one module each, registered in ``compressor.cli`` with one line."""
