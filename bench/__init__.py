"""Benchmarks: wsbus side by side with raw websockets, python-socketio and plain Pyro5."""
