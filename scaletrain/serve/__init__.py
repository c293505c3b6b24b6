"""`scaletrain serve`: a small HTTP completion server over any artefact (server.py)."""
