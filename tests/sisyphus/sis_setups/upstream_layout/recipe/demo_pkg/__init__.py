"""A small recipe collection laid out as upstream Sisyphus expects (recipe/<package>/, imported as demo_pkg.x)."""
