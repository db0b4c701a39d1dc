"""``python -m flexsurgeon``: the command line."""
from .cli import main

main(prog_name="flexsurgeon")
