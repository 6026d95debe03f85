"""The `cascade` command: the front door, which drives the roles (build, serve, queue, bench)."""
