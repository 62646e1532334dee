"""``Run``: one training job. Its identity is its name and its directory, everywhere.

The identity is ``IDENTITY_KEYS``: the engine (and its option set), the model, the track, the layout, the
batch and the precision. The name encodes it (model and track are in the directory above it)::

    experiments/data_parallel/tiny_llama/embedded_gpus4_mbs4_gbs32_seq128
    experiments/model_parallel/tiny_mixtral/nemo_tp2_ep2_dp1_sp_mbs4_gbs16_seq128_bf16
    experiments/model_parallel/mixtral_8x7b/nemo_tp1_pp4_ep8_dp1_mbs1_gbs128_seq2048_bf16   (pp > 1 only)
    experiments/data_parallel/llama31_8b/embedded_gpus1_mbs2_gbs8_seq4096_bf16_compile

The precision is part of the name unless it is ``auto`` (bf16 on a GPU, fp32 on the CPU); the option set's
name ends it where the study runs more than one option set of the engine (``ftscale.study.sweep``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftscale.engines import engine
from ftscale.engines.base import EngineSpec
from ftscale.study.data import dataset_name
from ftscale.study.layout import Layout
from ftscale.study.paths import RunPaths, data_dir, model_paths, run_dir

TRACKS = ("data_parallel", "model_parallel")

#: What makes two runs the same configuration (the participant comparison keys on these).
IDENTITY_KEYS = ("track", "model", "engine", "option_set", "precision", "gpus", "tp", "pp", "ep", "dp", "sp",
                 "micro_batch", "global_batch", "seq_length")

#: What run.json holds besides the fields of ``Run``: derived from them, written for the engines' and the
#: reader's convenience, never read back.
DERIVED_KEYS = ("name", "run_dir", "checkpoint", "tokenizer", "dataset_dir", "grad_accum", "data_parallel_size",
                "gpus_per_node")
#: Keys of run.json files written under an earlier name: old name -> field.
RENAMED_KEYS = {"extra": "engine_options"}


class RunFileError(ValueError):
    """A run.json that cannot be read as a run: names the file, the key and the value."""


@dataclass(frozen=True)
class Run:
    """One training job (see the module docstring for its identity)."""

    track: str
    model: str
    engine: str
    gpus: int
    tp: int
    ep: int
    dp: int
    sp: bool
    micro_batch: int
    global_batch: int
    seq_length: int
    steps: int
    warmup_steps: int
    learning_rate: float
    seed: int
    precision: str
    device: str
    lora: dict | None
    scaling: str | None = None  # data-parallel track: weak or strong
    pp: int = 1  # pipeline stages (model-parallel track; ftscale.study.layout)
    nodes: int = 1
    weights: str = "pretrained"
    engine_options: dict = field(default_factory=dict)  # the config's section named after the engine
    # The name of the engine's option set this run has, where the study runs several ("" otherwise).
    option_set: str = ""
    data: dict = field(default_factory=lambda: {"kind": "corpus"})  # the config's `data:` section
    # Set by the plan when it predicts an OOM and the config's plan.skip_predicted_oom is on: the job then
    # writes its files with status "skipped" instead of training (ftscale.run.launch).
    skip_reason: str = ""

    @classmethod
    def load(cls, path: Path | str) -> Run:
        """The run of a run.json file: the one reader of that file. Derived keys are skipped, keys of an
        earlier version are read under their current name; an unknown or missing key is a RunFileError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        except OSError as err:
            raise RunFileError(f"{path}: cannot be read: {err.strerror}") from None
        if not isinstance(data, dict):
            raise RunFileError(f"{path}: a run file holds a mapping of keys, not a {type(data).__name__}")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run") -> Run:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        given = {RENAMED_KEYS.get(k, k): v for k, v in data.items() if k not in DERIVED_KEYS}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise RunFileError(f"{source}: key {unknown[0]!r} = {given[unknown[0]]!r}: not a run field "
                               f"(the fields are {sorted(fields)})")
        missing = [name for name, f in fields.items() if name not in given
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RunFileError(f"{source}: key {missing[0]!r} is missing")
        if given.get("engine_options") is None:
            given["engine_options"] = {}
        return cls(**given)

    @property
    def spec(self) -> EngineSpec:
        """The run's engine (``ftscale.engines``)."""
        return engine(self.engine)

    @property
    def options(self) -> Any:
        """The engine's options for this run, typed (its ``Options`` dataclass)."""
        return self.spec.options(self)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, ep=self.ep, dp=self.dp, sp=self.sp, pp=self.pp)

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length

    @property
    def identity(self) -> tuple:
        return tuple(getattr(self, k) for k in IDENTITY_KEYS)

    @property
    def name(self) -> str:
        batch = f"mbs{self.micro_batch}_gbs{self.global_batch}_seq{self.seq_length}"
        precision = "" if self.precision == "auto" else f"_{self.precision}"
        options = f"_{self.option_set}" if self.option_set else ""
        if self.track == "data_parallel":
            ep = f"_ep{self.ep}" if self.ep > 1 else ""
            return f"{self.engine}_gpus{self.gpus}{ep}_{batch}{precision}{options}"
        return f"{self.engine}_{self.layout.label}_{batch}{precision}{options}"

    @property
    def directory(self) -> str:
        """Relative to the workflow's root directory."""
        return run_dir(self.track, self.model, self.name)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.directory))

    @property
    def checkpoint(self) -> str:
        return str(getattr(model_paths(self.model), self.spec.checkpoint_role))

    @property
    def tokenizer(self) -> str:
        """The tokenizer's directory: the Hugging Face import holds it."""
        return str(model_paths(self.model).checkpoint)

    @property
    def dataset_dir(self) -> str | None:
        """The prepared dataset the run reads (None for mock data, made inside the job, and for the
        corpus on the embedded engine, which reads the shipped text itself)."""
        if self.spec.reads_corpus_itself and self.data.get("kind", "corpus") == "corpus":
            return None
        name = dataset_name(self.data)
        return data_dir(name) if name else None

    def to_dict(self) -> dict:
        """The resolved configuration written to the run's run.json and read by the engines."""
        out = asdict(self)
        out.update(
            name=self.name,
            run_dir=self.directory,
            checkpoint=self.checkpoint,
            tokenizer=self.tokenizer,
            dataset_dir=self.dataset_dir,
            grad_accum=self.grad_accum,
            data_parallel_size=self.data_parallel_size,
            gpus_per_node=self.gpus_per_node,
        )
        return out
