"""Hydra's configs. A package so that they ship as gpt.conf (pyproject.toml), where `python -m
gpt.evaluate` reads them (pkg://gpt.conf), in an editable install as in a wheel."""
