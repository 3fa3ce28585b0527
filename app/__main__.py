"""`python -m app` is the `fraudscore` command."""

from app.cli import main

main()
