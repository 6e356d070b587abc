"""Command-line parsers (the only argparse in the library) and their conversion to typed configs.

One module per command family: ``inference`` (sd3_minimal_inference.py), ``data`` (dataset and cache
flags shared by the trainers and the cache tools), ``models`` (checkpoint and encoder flags).
"""
