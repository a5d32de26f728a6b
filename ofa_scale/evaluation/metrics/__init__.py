"""Metrics of the finetuning tasks (spec §6.2, §7). Each module computes one family on plain Python values.

Caption metrics are pycocoevalcap's scorers in COCOEvalCap's pipeline (`caption.py`); CIDEr-D is also written
out by hand (`cider.py`) for what the library cannot do: cached document frequencies (the SCST reward, OFA's
validation). Values are fractions (CIDEr-D carries its ×10).
"""
