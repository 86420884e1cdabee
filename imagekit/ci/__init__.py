"""``imagekit ci``: image pipelines over many clouds, one unit of work at a time.

A pipeline file (``imagekit-pipeline.yaml``, :mod:`imagekit.ci.model`) names images
(recipes and a matrix of their variables), clouds, channels, the test gate, retention,
the shared step cache and notifications. Each image x matrix row is a *unit*. imagekit
plans (:mod:`~imagekit.ci.plan`), runs one unit (:mod:`~imagekit.ci.runner`), gates
(:mod:`~imagekit.ci.gate`), promotes (:mod:`~imagekit.ci.promote`), rotates
(:mod:`~imagekit.ci.rotate`) and reports (:mod:`~imagekit.ci.status`); the fan-out over
runners is the CI system's job (:mod:`~imagekit.ci.emit` writes its configuration), and
the runners share their work through the shared step cache (:mod:`imagekit.cache_remote`,
:mod:`~imagekit.ci.cache_oci`).
"""
