"""The import stage: each model's checkpoint, written once and read-only afterwards.

- ``checkpoint``: the Hugging Face checkpoint under ``models/<m>/model`` (synthetic, local or hub
  source), written atomically; ``load_for_training`` reads it back;
- ``synthetic``: seeded weights and a tokenizer trained on the shipped corpus;
- ``nemo``: NeMo's conversion of that checkpoint into ``models/<m>/nemo`` (``llm.import_ckpt``).

Imports only ``ftscale.study``.
"""
