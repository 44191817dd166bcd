"""A subscriber written with FastStream: see app.py and README.md."""
