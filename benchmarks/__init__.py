"""Side-by-side measurements against the PyTorch idiom each replaces:
``python -m benchmarks.<name> --help``. Their figures are in the README."""
