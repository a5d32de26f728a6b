"""`ofa-predict`: batch inference with a trained model (issue 12 §1)."""
