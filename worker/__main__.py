"""``python -m worker`` runs the ``worker`` command."""

from worker.cli import main

if __name__ == "__main__":
    main()
