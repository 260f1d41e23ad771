"""Layer 8: the command-line interface (thin: parse arguments, call the layers below)."""
