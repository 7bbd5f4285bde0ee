"""What the tests share that is not a fixture: stand-in servers, processes, helpers."""
