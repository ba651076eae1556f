"""hiradix."""
