"""``python -m pipeline`` = ``compress-and-export``."""

from .cli import main

main()
