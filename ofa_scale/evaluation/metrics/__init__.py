"""Metrics of the finetuning tasks (spec §6.2, §7). Each module computes one family on plain Python values.

Caption metrics follow pycocoevalcap's definitions on already-tokenised, space-separated text; CIDEr-D also
supports cached document frequencies (for the SCST reward). Values are fractions (CIDEr-D carries its ×10).
"""
