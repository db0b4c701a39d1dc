"""``python -m flexsurgeon``: the command line."""
from .cli.main import main

main(prog_name="flexsurgeon")
