"""kvloom's benchmark harness (not part of the test run). See `python -m bench --help`."""
