"""One module per kind of thing a process holds (STYLE.md example 11)."""
