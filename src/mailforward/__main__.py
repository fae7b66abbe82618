"""``python -m mailforward`` is the ``mailforward`` command."""

from .cli import main

main()
