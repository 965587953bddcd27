"""Data only: default.toml, the one table of every setting's default (read by server/settings.py).

A package so the file ships inside the distribution (non-editable installs, the CUDA image).
"""
