"""Thin Click commands over `pipeline`: parse options and config, call one library function, print a summary."""
