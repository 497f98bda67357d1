"""``python -m stages`` is the same as the ``ptqflow`` console script."""

from stages.cli import main

main()
