"""Ray at the edges: the sweep's steps (sweep.py), its Tune experiments (tune.py), what every Tune trial shares
(trial.py), the Ray Data stages (data.py) and the storage check (preflight.py), each wrapping the plain functions
of geovq.stages."""
