"""The thin, stateless kernel layer: ctypes calls and /proc parsers.

Nothing here imports from the layers above; failures are OSError.
"""
