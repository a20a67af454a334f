"""``python -m vbcompress.cli``: the same as the ``vbcompress`` command."""

from . import main

main()
