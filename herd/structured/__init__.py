"""Structured outputs by constrained decoding: a request's JSON schema, regex, choice or grammar
becomes a token mask applied to its logits at every step (spec.py: what a request asks, plain
data; grammars.py: its grammar text and the request-time check; backend.py: the vocabulary
prepared for llguidance once per model; manager.py: compile pool, cache and the step's masks).
"""
