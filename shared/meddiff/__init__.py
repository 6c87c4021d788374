"""meddiff: the shared library behind the meddiff MONAI bundles."""

__version__ = "0.1.0"
