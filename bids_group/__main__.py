"""``python -m bids_group``: the same as the ``bids-group`` command."""

from bids_group.cli import console_main

if __name__ == "__main__":
    console_main()
