"""Entry point of ``python -m wartok_cli``."""

from wartok_cli.app import app

app(prog_name="wartok")
