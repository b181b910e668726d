"""SLIM: attention labelling on a small sample, propagation, and balanced curation.

One module per step of ALGORITHMS.md ("SLIM"), so each can be checked on hand-made data:
:mod:`aiou` (attention quality against a mask), :mod:`attention` (GradCAM maps and the two
attention vectors), :mod:`space` (2-D embeddings), :mod:`sampling` (which images to show a
person), :mod:`annotations` (the CSV exchange and the simulated annotators),
:mod:`propagation` (label spreading), :mod:`curation` (the balanced subset, with
:mod:`clustering` for its single-threaded k-means), and
:mod:`pipeline`, which chains them through the stage cache. Retraining: :mod:`modes` (what
each retrain mode samples and curates), :mod:`dfr` (the L1 logistic regressions of
last-layer mode) and :mod:`last_layer` (its trial).
"""
