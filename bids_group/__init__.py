"""bids-group: group-level (second-level) neuroimaging statistics as a BIDS-App."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bids-group")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

CODE_URL = "https://github.com/bids-group/bids-group"
