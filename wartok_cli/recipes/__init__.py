"""Recipes shipped inside the package; `wartok pipeline` with no recipe runs quickstart.yaml."""
