"""Ray at the edges: Tune trials (and later Ray Data stages) that wrap the plain functions of pipeline.py."""
