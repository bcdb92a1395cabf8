"""The review web app (``python -m pipeline review OUT/``) and the labels it writes.

Modules, one job each: :mod:`.catalog` (what an output folder holds), :mod:`.labels` (label files),
:mod:`.agreement` (kappa between annotators), :mod:`.tiles` (Deep Zoom tiles and crops cut from
slides), :mod:`.security` (loopback and token rules), :mod:`.app` (routes) and :mod:`.server`
(starting it). Only :mod:`.app` and :mod:`.server` need the ``review`` extra (Flask, waitress).
"""
