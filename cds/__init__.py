"""psych-cds: clinical decision support for mental-health risk supervision."""

__version__ = "0.1.0"
