"""End-to-end tests: client, master and workers as real processes over loopback."""
