"""Build tooling of the repository (not part of the course's ``shared`` layers)."""
