"""MedIQA scoring engine: everything needed to turn a file into a quality score.

This package never imports ``training``, ``export`` or ``mediqa_cli``.
"""

__version__ = "0.1.0"
