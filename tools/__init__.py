"""Tools around the harness: they build inputs, estimate and check, and are never imported by it.

- demo_corpus.py       the offline demo corpus (four SmolLM-Corpus-like domains from installed text)
- cost.py              GPU-hours of scoring and pretraining from a preset's `cost:` section
- replay_humaneval.py  replays canonical / broken HumanEval solutions through the real eval path

Run as `python -m tools.<name>`. The dependency is one way: tools import the library, never the
reverse.
"""
