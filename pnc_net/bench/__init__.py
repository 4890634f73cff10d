"""The benchmark harness: PNC against parameter-tuning baselines (``pnc bench``).

``harness`` (cells, workers, results), ``baselines`` (FT, LwF, KD, Oracle,
PNC-F), ``transmission`` (what travels, Sim), ``plots`` (the only place
matplotlib is imported).
"""
