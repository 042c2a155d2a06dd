"""Evaluation: needle in a haystack, perplexity and bits per byte, the task harness, and the
report card (`internlm2 eval ...`)."""
