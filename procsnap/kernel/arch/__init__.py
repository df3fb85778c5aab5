"""Architecture layouts; only x86_64 exists so far."""
