"""MedIQA command line: thin Click commands over ``engines`` / ``training`` / ``export``."""
