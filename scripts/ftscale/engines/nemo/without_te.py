"""Workarounds that let NeMo 2.7.3 train without Transformer Engine (``nemo: {transformer_impl: local}``),
each reproduced and tested on the CPU in tests/nemo. Each one changes
a NeMo module only for the duration of ``te_free_training()`` and only when TE is missing; the NeMo container,
which has TE, runs NeMo unchanged. The conversion's workaround is ``ftscale.engines.nemo.convert.te_free_importer``.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def te_free_lora():
    """Workaround (NeMo 2.7.3): ``LoRA.transform`` (nemo/collections/llm/peft/lora.py) asks every target
    module ``m.__class__ == te.Linear`` before it looks at Megatron's own linear layers; without Transformer
    Engine ``te`` is NeMo's placeholder, whose every attribute raises ``UnavailableError: transformer_engine.pytorch
    could not be imported``, and training stops there. For the duration, and only
    when TE is missing, ``te`` is a stand-in whose ``Linear`` no module is an instance of: local-spec layers then
    take NeMo's own ParallelLinearAdapter path. That path (``peft.utils.get_adapter_attributes_from_linear``)
    trusts ``HAVE_TE``, which is True without TE: megatron-core 0.15.3's TE extension module imports and sets
    its TE classes to None, so ``isinstance(m, None)`` raises TypeError; its ``HAVE_TE`` is False meanwhile."""
    import types

    from nemo.collections.llm.peft import lora, utils

    if lora.HAVE_TE:
        yield
        return

    class NoTransformerEngineLinear:  # never instantiated: `m.__class__ == te.Linear` is False for every m
        pass

    saved = lora.te, utils.HAVE_TE
    lora.te, utils.HAVE_TE = types.SimpleNamespace(Linear=NoTransformerEngineLinear), False
    try:
        yield
    finally:
        lora.te, utils.HAVE_TE = saved


@contextlib.contextmanager
def mock_data_with_attention_mask():
    """Workaround (NeMo 2.7.3): without TE, Megatron's local attention needs an attention mask from the data
    (``gpt_forward_step`` asserts one), and ``MockDataModule`` means to make one (``create_attention_mask``
    is forced on without TE), but its ``setup`` passes that flag positionally into ``_MockGPTDataset``'s
    ``seed`` parameter, so no mask is ever made (the second NeMo training on the H200 stopped at that
    assertion). For the duration, ``setup`` passes it by keyword; the datasets are otherwise NeMo's."""
    from nemo.collections.llm.gpt.data import mock

    if mock.HAVE_TE:
        yield
        return
    original = mock.MockDataModule.setup

    def setup(self, stage: str = "") -> None:
        def dataset(name: str, samples: int):
            return mock._MockGPTDataset(self.tokenizer, name, samples, self.seq_length,
                                        create_attention_mask=self.create_attention_mask)

        self._train_ds = dataset("train", self.num_train_samples)
        self._validation_ds = dataset("valid", self.num_val_samples)
        self._test_ds = dataset("test", self.num_test_samples)

    mock.MockDataModule.setup = setup
    try:
        yield
    finally:
        mock.MockDataModule.setup = original


@contextlib.contextmanager
def te_free_training():
    """Every workaround of this module, for one ``llm.finetune`` with Megatron's local layer spec."""
    with te_free_lora(), mock_data_with_attention_mask():
        yield
