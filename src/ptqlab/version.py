"""ptqlab's version: a leaf module, so that run records can name it without importing the package above them."""

__version__ = "0.1.0"
