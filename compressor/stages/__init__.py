"""Stage registry: explicit, by name, lazily imported (peft's one-call registration, Olive's passes).

A stage is one module, ``compressor/stages/<type>.py``, holding its pydantic config (with
``type: Literal["<type>"]``), its ``run(config, ctx, input_dir, out_dir) -> summary`` and ONE
:class:`Declaration` named ``STAGE``: everything the pipeline must know about it, as data. The
recipe's stage union, the list of stage types, the reference docs, the runner's cache keys,
pre-flight, the offline plan, distributed runs and the model card read only declarations;
nothing outside a stage's own module tests its type.

Adding a stage is its module plus one line in :data:`REGISTRY` (or
``register_stage("my_stage", "my_package.my_stage")`` from outside the package)::

    from compressor.recipe.schema import StageBase
    from compressor.stages import Declaration

    class MyStage(StageBase):
        \"\"\"One line that the reference and the model card show.\"\"\"
        type: Literal["my_stage"]
        ...

    def run(cfg, ctx, input_dir, out_dir) -> dict: ...

    STAGE = Declaration(config=MyStage, run=run, produces_model=True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from compressor.errors import UserInputError

REGISTRY: dict[str, str] = {
    "lora_finetune": "compressor.stages.lora_finetune",
    "finetune": "compressor.stages.finetune",
    "merge_adapters": "compressor.stages.merge_adapters",
    "remove_layers": "compressor.stages.remove_layers",
    "prune_width": "compressor.stages.prune_width",
    "reduce_queries": "compressor.stages.reduce_queries",
    "select_queries": "compressor.stages.select_queries",
    "merge_tokens": "compressor.stages.merge_tokens",
    "heal": "compressor.stages.heal",
    "quantize": "compressor.stages.quantize",
    "distill": "compressor.stages.distill",
    "export": "compressor.stages.export",
    "evaluate": "compressor.stages.evaluate",
    "predict": "compressor.stages.predict",
}


def _none(cfg) -> dict:
    return {}


def _no(cfg) -> bool:
    return False


@dataclass(frozen=True)
class Declaration:
    """What the pipeline knows about one stage type (Olive's pass declarations, as data).

    Attributes:
        config: the stage's pydantic config class (``type: Literal["<type>"]``; its docstring's
            first line is the stage's one-line description in the docs and the model card).
        run: ``run(cfg, ctx, input_dir, out_dir) -> dict``: reads the input model folder, writes a
            NEW folder (never changes its input) and returns a JSON-able summary for the manifest.
        produces_model: its output folder holds a new model (``model/``) that becomes the next
            stage's input; False: only artifacts (metrics, exports, predictions).
        trains: it runs a training loop: every process of an ``accelerate launch`` runs it
            together (the others wait at a barrier for every other stage), and the number of
            processes is part of its cache key.
        sharded: under ``accelerate launch`` every process runs it, each on its share of the data
            (captions of its batches), and the main process gathers, scores and writes its output; its
            output equals a single process's, so the number of processes is not part of its key.
        uses_generation: the recipe's decoding settings are part of its cache key.
        data: ``cfg → {data section: example limit or None}``: the sections it reads (part of
            its cache key, loaded and checked by pre-flight; a recipe without ``data:`` is refused).
        references: ``cfg → {role: (label, field path)}``: outputs of earlier stages it reads by
            label (a distillation teacher); the label must come earlier, and that stage's key is
            part of this one's under ``role``.
        reads_export: ``cfg → bool``: it reads the latest ``export`` stage's output (part of its key).
        folders: ``cfg → {role: path}``: folders outside the run it reads by path (a speculative
            draft); the content hash of each is part of its key under ``role``.
        adapter: ``cfg → "writes" | "merges" | None``: it leaves a LoRA adapter to merge, or merges one.
        needs_merged: it works on the model's own weights, so a pending LoRA adapter must be
            merged before it.
        output: ``"export"`` (later stages read its folder as the latest export) or
            ``"evaluation"`` (its ``eval.json`` goes into the report under its label; gate labels
            name these), or None.
        reshapes: it changes the model's shapes, so an adapter trained after it no longer fits
            the base model (said on the card of a pushed adapter).
        trainable_params: ``summary → int | None``: parameters it trained (the report's
            ``params_trainable`` of later evaluations).
        check: ``check(cfg, pf)`` in pre-flight with the model's config known: raises
            ``UserInputError`` (``FieldProblem`` to point at a sub-field); may shrink the simulated
            config (``pf.config``) that later stages are checked against.
        check_recipe: ``check_recipe(cfg, recipe)`` in pre-flight, without the model (Java,
            metric model folders).
        check_data: ``check_data(cfg, recipe, datasets)`` once the data is loaded.
        plan: ``plan(cfg, pc) -> dict``: its effect on the meta-device model of ``compress plan``
            (``pc.model``, ``pc.family``, ``pc.notes``, ``pc.index``), returning the extras of
            its row (``removed``, ``params_trainable``, ``lora_matches``, ``effect``: a short
            text of what it changed).
        card: ``card(record) -> StageCard``: what the model card says of one run of it
            (``record``: the report's stage entry with its summary).
    """

    config: type
    run: Callable[..., dict]
    produces_model: bool
    trains: bool = False
    sharded: bool = False
    uses_generation: bool = False
    data: Callable[[Any], dict[str, int | None]] = _none
    references: Callable[[Any], dict[str, tuple[str, tuple]]] = _none
    reads_export: Callable[[Any], bool] = _no
    folders: Callable[[Any], dict[str, str]] = _none
    adapter: Callable[[Any], str | None] = lambda cfg: None
    needs_merged: bool = False
    output: str | None = None
    reshapes: bool = False
    trainable_params: Callable[[dict], int | None] | None = None
    check: Callable[[Any, Any], None] | None = None
    check_recipe: Callable[[Any, Any], None] | None = None
    check_data: Callable[[Any, Any, dict], None] | None = None
    plan: Callable[[Any, Any], dict] | None = None
    card: Callable[[dict], StageCard] | None = None

    @property
    def type(self) -> str:
        """The stage type (the ``Literal`` of the config's ``type`` field)."""
        import typing

        return typing.get_args(self.config.model_fields["type"].annotation)[0]

    @property
    def description(self) -> str:
        """The first line of the config's docstring."""
        return (self.config.__doc__ or "").strip().splitlines()[0] if self.config.__doc__ else ""


@dataclass
class StageCard:
    """What the model card says of one stage: details on its line, metadata tags, limitations,
    and, when its output no longer loads with transformers' ``from_pretrained``, how it loads
    (``loading``: a sentence and Python code, see :func:`exporters.model_card.build_model_card`)."""

    details: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    loading: str | None = None


class FieldProblem(UserInputError):
    """A pre-flight problem of one sub-field of a stage (reported at that field's line).

    Attributes:
        field: the path below the stage, e.g. ``("quantization",)``.
    """

    def __init__(self, field: tuple, message: str):
        super().__init__(message)
        self.field = tuple(field)


def register_stage(type_: str, module: str) -> None:
    """Register (or replace) stage ``type_`` implemented by ``module`` (a dotted module path).

    The recipe schema is rebuilt on next use, so recipes may use the new type at once.
    """
    REGISTRY[type_] = module
    from compressor.recipe import schema

    schema.recipe_model.cache_clear()


def stage_types() -> tuple[str, ...]:
    """Every registered stage type, in registration order."""
    return tuple(REGISTRY)


def get_stage(type_: str) -> ModuleType:
    """Import and return the module of stage ``type_``.

    Raises:
        KeyError: unknown stage type (the recipe schema rejects these before this is reached).
    """
    return importlib.import_module(REGISTRY[type_])


def declaration(type_: str) -> Declaration:
    """The :class:`Declaration` of stage ``type_`` (its module's ``STAGE``).

    Raises:
        KeyError: unknown stage type.
        TypeError: the module declares another type than it is registered under.
    """
    decl = get_stage(type_).STAGE
    if decl.type != type_:
        raise TypeError(f"{REGISTRY[type_]} declares stage type '{decl.type}' but is registered as '{type_}'")
    return decl


def declarations() -> list[Declaration]:
    """Every registered stage's declaration, in registration order."""
    return [declaration(t) for t in REGISTRY]


def card_notes(record: dict) -> StageCard:
    """What the model card says of one stage record (the report's stage entry); empty for unknown types."""
    t = record.get("type")
    if t not in REGISTRY:
        return StageCard()
    decl = declaration(t)
    return decl.card(record) if decl.card is not None else StageCard()


def describe(type_: str) -> str:
    """The one-line description of a stage type ('' for unknown types)."""
    return declaration(type_).description if type_ in REGISTRY else ""
