"""Runnable studies and tools: `python scripts/NAME.py` (they import the installed package, never sys.path)."""
