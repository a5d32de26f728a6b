"""`ofa-demo`: a local gradio page with one tab per capability of a trained model (issue 12 §2)."""
