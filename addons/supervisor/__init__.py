"""The supervisor: one Waypost instance as N mitmdump worker processes (`server.workers`)."""
