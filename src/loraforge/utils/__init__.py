"""Small low-level helpers shared by several packages."""
