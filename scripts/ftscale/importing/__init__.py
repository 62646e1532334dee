"""The import stage: each model's checkpoint, written once and read-only afterwards.

- ``checkpoint``: the Hugging Face checkpoint under ``models/<m>/model`` (synthetic, local or hub
  source), written atomically; ``load_for_training`` reads it back;
- ``synthetic``: seeded weights and a tokenizer trained on the shipped corpus.

An engine that reads another format converts this checkpoint itself (NeMo: ``ftscale.engines.nemo.convert``).

Imports only ``ftscale.study``.
"""
