"""The model registry: each kind of network is one entry, a ``ModelConfig`` subclass.

An entry holds everything the engine asks of a kind, so nothing outside it asks which kind a model is:

- its config: the fields beyond the shared ones (``model.model``, the sample shape, the classes);
- ``construct`` / ``build``: the network from constructor arguments, or from the config;
- what the parallel plan wraps: ``blocks`` (activation checkpointing, per-block compile and an FSDP
  unit each), ``fp32_modules`` (sharded apart and kept in fp32), ``head_modules`` (other FSDP units),
  ``COMPILE_DYNAMIC``;
- the authors' checkpoints: ``OFFICIAL_DEFAULTS`` and ``official_kwargs`` (building a model that fits
  one of their state dicts); other codebases' flow models: ``foreign_state_dict`` (SiT's, for the DiT);
- what sampling needs: ``sample_shape``, ``condition``, ``embeds_augment_labels``; and what a packaged
  sampler needs (``soflow_fast.shipping``): ``label_count`` (the labels it accepts), ``condition_example``
  (the conditioning input it is traced with), ``latent_channels`` (whether a VAE can decode its samples);
- its rules against the rest of a training config (``check_with``).

Adding a kind is one file with one decorated class::

    @register_model
    @dataclass(kw_only=True)
    class TinyConfig(ModelConfig):
        LABEL = "Tiny"
        width: int = option(32, check=at_least(1))  # the hidden width

        @classmethod
        def construct(cls, name, **kwargs):
            return TinyNet(**kwargs)

        def build_kwargs(self):
            return dict(in_channels=self.in_channels, width=self.width, num_classes=self.num_classes)

after which ``--model=Tiny --width=64`` trains it, with checkpoints, resumes, grids and evals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from soflow_fast.config_fields import Registry, VariantSection, at_least, config_error, in_range, option

_KINDS = Registry("model kind")
register_model = _KINDS.register  # a decorator: adds a ModelConfig subclass with its own LABEL


def model_kinds() -> dict[str, type[ModelConfig]]:
    """Label -> config class of every registered kind."""
    return dict(_KINDS)


@dataclass(kw_only=True)
class ModelConfig(VariantSection):
    """The network: ``model`` picks the kind (and, for a DiT, its size); the kind adds its own fields."""

    SECTION: ClassVar[str] = "model"
    VARIANT_KEY: ClassVar[str] = "model"
    LABEL: ClassVar[str] = ""  # the kind's name in the registry and in messages
    COMPILE_DYNAMIC: ClassVar[bool | None] = None  # per-block compile: False compiles each block with static shapes
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}  # `sample --official` sizes a user did not give
    CONDITIONS: ClassVar[tuple[str, ...]] = ("labels",)  # what the kind can be conditioned on: "labels", "obs"

    model: str = option("DiT-T/2")  # the kind: a DiT size (DiT-B/2; the authors' DiT-B-2), UNet, or another
    # registered kind's LABEL
    input_size: int = option(8, check=at_least(1))  # spatial size of the data (latent size for latent data)
    in_channels: int = option(1, check=at_least(1))
    num_classes: int = option(10, check=at_least(0))  # 0 = unconditional
    class_dropout_prob: float = option(0.1, check=in_range(0, 1))  # > 0 adds the null-label row that guidance
    # trains

    # -- the registry ----------------------------------------------------------------------------

    @classmethod
    def variants(cls) -> dict[str, type[ModelConfig]]:
        return model_kinds()

    @classmethod
    def variant_of(cls, value: Any) -> tuple[type[ModelConfig], str]:
        for kind in _KINDS.values():
            name = kind.canonical(value)
            if name is not None:
                return kind, name
        known = [n for kind in _KINDS.values() for n in kind.names()]
        raise ValueError(f"unknown model {value!r}; known: {', '.join(known)}")

    @classmethod
    def canonical(cls, name: str) -> str | None:
        """``name`` as this kind spells it, or None when it is not one of this kind's names."""
        return cls.LABEL if name == cls.LABEL else None

    @classmethod
    def names(cls) -> list[str]:
        """The ``model.model`` values of this kind (for messages)."""
        return [cls.LABEL]

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def construct(cls, name: str, **kwargs) -> nn.Module:
        """The network from its constructor's keyword arguments (``name`` as ``canonical`` gives it)."""
        raise NotImplementedError(f"model kind {cls.LABEL} has no construct()")

    def build_kwargs(self) -> dict[str, Any]:
        """The constructor arguments this config describes."""
        return dict(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes)

    def build(self) -> nn.Module:
        """The network this config describes (on the CPU, freshly initialised)."""
        return self.construct(self.model, **self.build_kwargs())

    # -- what the parallel plan wraps ---------------------------------------------------------------

    @staticmethod
    def blocks(model: nn.Module) -> list[tuple[Any, Any]]:
        """(container, key) of each repeated block: checkpointed, compiled and sharded one by one."""
        return []

    @staticmethod
    def fp32_modules(model: nn.Module) -> list[nn.Module]:
        """Modules sharded apart and kept in fp32 under FSDP (time embedders: bf16 would round t)."""
        return [m for m in (getattr(model, "t_embedder", None), getattr(model, "s_embedder", None)) if m is not None]

    @staticmethod
    def head_modules(model: nn.Module) -> list[nn.Module]:
        """Other modules sharded as units of their own (the rest stays with the root)."""
        return []

    # -- what sampling needs ---------------------------------------------------------------------

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (and of its noise)."""
        return (self.in_channels, self.input_size, self.input_size)

    def condition(self) -> tuple[str, int] | None:
        """What this network is conditioned on (one of ``CONDITIONS``): ("labels", num_classes), ("obs",
        width), or None."""
        return ("labels", self.num_classes) if self.num_classes else None

    def embeds_augment_labels(self) -> bool:
        """Whether every network call takes the step's augmentation labels (``augment_labels=``)."""
        return False

    def label_count(self) -> int:
        """How many label values the network embeds, 0..label_count - 1: the classes, and the null label
        (index num_classes, the unconditional sample) when it trained with label dropout. A packaged
        sampler refuses any other label."""
        return self.num_classes + int(self.class_dropout_prob > 0) if self.num_classes else 0

    def condition_example(self, batch: int) -> torch.Tensor | None:
        """A conditioning input for ``batch`` samples, of the dtype and shape the network takes (what
        exporting a sampler traces with), or None for an unconditional network."""
        condition = self.condition()
        if condition is None:
            return None
        name, size = condition
        if name == "labels":
            return torch.arange(batch) % size  # (B,) int64
        return torch.zeros(batch, size)  # (B, width) float32 observations

    def latent_channels(self) -> int | None:
        """The channels of the latents a VAE decodes into images, when this network's samples are such
        latents (``--vae``); None when its samples are no images."""
        return self.in_channels

    # -- the authors' checkpoints ----------------------------------------------------------------

    @classmethod
    def official_kwargs(cls, kwargs: dict[str, Any], state: Mapping) -> dict[str, Any]:
        """Constructor arguments made to fit an authors' state dict (``sample --official``)."""
        return kwargs

    @classmethod
    def foreign_state_dict(cls, state: Mapping, model: nn.Module) -> dict[str, Any]:
        """Another codebase's flow-model checkpoint as ``model``'s state dict (``run.teacher``, ``run.init_from``).

        ``state`` is the checkpoint as ``torch.load`` gave it; ``model`` a freshly built network of this kind,
        whose initial weights fill what the checkpoint lacks. The result is in this engine's names and time
        convention (t = 1 is noise; F(x, t, t) the velocity). A kind that converts none raises ValueError.
        """
        raise ValueError(
            f"model kind {cls.LABEL} reads no other codebase's checkpoint, and this one is not in its names"
        )

    # -- rules -----------------------------------------------------------------------------------

    def check(self) -> None:
        condition = self.condition()
        if self.LABEL and self.num_classes and (condition is None or condition[0] != "labels"):
            what = "unconditional" if condition is None else f"conditioned on {condition[0]}, not classes"
            raise config_error(self.key("num_classes"), f"must be 0: model.model={self.model} is {what}",
                               self.num_classes)  # fmt: skip


def build_model(name: str, **kwargs) -> nn.Module:
    """A network by name and constructor arguments: a DiT size (``DiT-B/2``, or the authors' ``DiT-B-2``),
    ``UNet``, or another registered kind.

    ``build_model("DiT-B/2", input_size=32, in_channels=4, num_classes=1000)``,
    ``build_model("UNet", input_size=32, in_channels=3)``.
    """
    kind, canonical = ModelConfig.variant_of(name)
    return kind.construct(canonical, **kwargs)
