"""Benchmarks that run in the repository with one command each, for example
``python -m bn_reference.benchmarks.backprop``; the book pages draw their speed
figures with the same code at a smaller setting."""
