"""Recipes: TOML files (read with the standard library's ``tomllib``) that describe every stage.

Like SparseML's recipes, one file says what to prune and how, how to pack and quantize, and what
to export and measure; command-line options override single fields.  Every section and key is
optional; the defaults are the embedded default job (``recipes/default.toml``)::

    [model]
    name = "ds2-mini"                 # a zoo model (compressor.zoo.build_model) …
    checkpoint = "ds2-mini-digits"    # … with a shipped checkpoint, or a path (.pt state_dict, .safetensors, .pt2)
    # factory = "my_pkg.models:build" # or a factory "module.path:function" / "file.py:function"

    [data]
    task = "speech-digits"            # speech-digits | speech-sentences | fashion-mnist | digits | charlm | none | module:function
    eval_limit = 200                  # evaluate on the first N held-out examples
    input_shapes = []                 # e.g. ["1,1,64,100"] or ["2,35:int64"]; default: one evaluation batch of size 1

    [prune]
    method = "gradual"                # gradual (Narang threshold) | cubic | hard (one-shot) | taylor | none
    sparsity = 0.9
    block = "1x1"                     # r×c blocks, e.g. "16x1"
    steps = 200                       # fine-tuning steps (pruning runs inside them)
    lr = 5e-4
    start_fraction = 0.0              # the schedule starts / ends at these fractions of the steps
    end_fraction = 0.75
    freq = 10                         # mask updates every freq steps (Narang's freq)
    include = ""                      # regular expression of weight names (default: the model's own rule)
    exclude = ""
    # taylor (structured, Molchanov et al. 2019): `sparsity` is the fraction of the parameters (or
    # FLOPs) removed by cutting whole channels / neurons / hidden units; every `freq` steps the
    # least important `taylor_step_fraction` of the units go, fine-tuning in between
    taylor_criterion = "taylor_fo_gate"  # any criterion of compressor.taylor.criteria
    taylor_target = "params"          # params | flops
    taylor_step_fraction = 0.02       # fraction of the prunable units removed per round (Molchanov: ~2 %)

    [pack]
    format = "auto"                   # auto | csr | bsr | bitmask | dense
    int8 = true

    [export]
    formats = ["onnx", "tvm"]
    targets = ["host"]                # host | aarch64-linux | android
    device = ""                       # rpc://host:port or tracker://host:port/key: time the TVM library there
    activations = "fp32"              # fp32 | int8: TVM quantizes the inputs of 16x1-block int8 matmuls (x86 VNNI)

    [check]
    batches = [1]                     # latency batch sizes
    threads = 1
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from compressor.blocks import BlockShape

RECIPE_DIR = Path(__file__).parent / "recipes"
PRUNE_METHODS = ("gradual", "cubic", "hard", "taylor", "none")
EXPORT_FORMATS = ("onnx", "tvm")
PACK_FORMATS = ("auto", "csr", "bsr", "bitmask", "dense")


class RecipeError(ValueError):
    """A recipe (file or override) that cannot be used; the message says what to change."""


@dataclass
class ModelSection:
    name: str = "ds2-mini"
    checkpoint: str = "ds2-mini-digits"
    factory: str = ""
    trust_checkpoint: bool = False


@dataclass
class DataSection:
    task: str = "speech-digits"
    eval_limit: int = 200
    input_shapes: list[str] = field(default_factory=list)


@dataclass
class PruneSection:
    method: str = "gradual"
    sparsity: float = 0.9
    block: str = "1x1"
    steps: int = 200
    lr: float = 5e-4
    start_fraction: float = 0.0
    end_fraction: float = 0.75
    freq: int = 10
    include: str = ""
    exclude: str = ""
    taylor_criterion: str = "taylor_fo_gate"
    taylor_target: str = "params"
    taylor_step_fraction: float = 0.02
    seed: int = 0

    @property
    def block_shape(self) -> BlockShape:
        return parse_block(self.block)


@dataclass
class PackSection:
    format: str = "auto"
    int8: bool = True


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    targets: list[str] = field(default_factory=lambda: ["host"])
    device: str = ""
    activations: str = "fp32"


@dataclass
class CheckSection:
    batches: list[int] = field(default_factory=lambda: [1])
    threads: int = 1


@dataclass
class Recipe:
    """A whole recipe; :func:`load_recipe` reads one, :meth:`override` applies command-line values."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prune: PruneSection = field(default_factory=PruneSection)
    pack: PackSection = field(default_factory=PackSection)
    export: ExportSection = field(default_factory=ExportSection)
    check: CheckSection = field(default_factory=CheckSection)

    def override(self, **values: Any) -> Recipe:
        """A copy with ``section__key=value`` overrides (``None`` values are ignored)."""
        recipe = dataclasses.replace(self, **{f.name: dataclasses.replace(getattr(self, f.name))
                                              for f in dataclasses.fields(self)})
        for dotted, value in values.items():
            if value is None:
                continue
            section, _, key = dotted.partition("__")
            _set(recipe, section, key, value)
        validate(recipe)
        return recipe

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_block(text: str) -> BlockShape:
    """``"16x1"`` → ``BlockShape(16, 1)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", str(text))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise RecipeError(f"block {text!r} is not a block shape: write ROWSxCOLS with positive numbers, e.g. 16x1")
    return BlockShape(int(match[1]), int(match[2]))


def _section(recipe: Recipe, name: str) -> Any:
    """The section ``name`` of ``recipe``; :class:`RecipeError` for an unknown name."""
    names = [f.name for f in dataclasses.fields(recipe)]
    if name not in names:
        raise RecipeError(f"unknown recipe section {name!r}: use one of {', '.join(names)}")
    return getattr(recipe, name)


def _set(recipe: Recipe, section: str, key: str, value: Any) -> None:
    target = _section(recipe, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise RecipeError(f"unknown key {key!r} in [{section}]: use one of {', '.join(fields)}")
    default = getattr(type(target)(), key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"[{section}] {key} = {value!r}: write true or false")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"[{section}] {key} = {value!r}: write a whole number")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
            raise RecipeError(f"[{section}] {key} = {value!r}: write a finite number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise RecipeError(f"[{section}] {key} = {value!r}: write a quoted string")
    elif isinstance(default, list):
        if isinstance(value, (str, int)):
            value = [value]
        (item,) = get_args(get_type_hints(type(target))[key])
        if not isinstance(value, list) or any(not isinstance(v, item) or isinstance(v, bool) for v in value):
            kind = "quoted strings" if item is str else "whole numbers"
            raise RecipeError(f"[{section}] {key} = {value!r}: write a list of {kind}, "
                              f"e.g. {default or ['1,1,64,100']!r}")
    setattr(target, key, value)


def validate(recipe: Recipe) -> None:
    """Every value in range and every name known; raises :class:`RecipeError` otherwise."""
    p = recipe.prune
    if p.method not in PRUNE_METHODS:
        raise RecipeError(f"[prune] method = {p.method!r}: use one of {', '.join(PRUNE_METHODS)}")
    if not 0.0 <= p.sparsity < 1.0:
        raise RecipeError(f"[prune] sparsity = {p.sparsity}: use a fraction in [0, 1), e.g. 0.9")
    p.block_shape  # noqa: B018 - parses (and so checks) the block
    if p.steps < 0 or p.freq < 1:
        raise RecipeError("[prune] steps must be ≥ 0 and freq ≥ 1")
    if not 0.0 <= p.start_fraction < p.end_fraction <= 1.0:
        raise RecipeError("[prune] need 0 ≤ start_fraction < end_fraction ≤ 1")
    if not 0.0 < p.taylor_step_fraction < 1.0:
        raise RecipeError("[prune] taylor_step_fraction must be in (0, 1)")
    if not p.lr > 0.0:
        raise RecipeError(f"[prune] lr = {p.lr}: use a positive learning rate, e.g. 5e-4")
    for key in ("include", "exclude"):
        try:
            re.compile(getattr(p, key))
        except (re.error, OverflowError, RecursionError) as error:
            raise RecipeError(f"[prune] {key} = {getattr(p, key)!r} is not a regular expression ({error}): "
                              "fix the pattern") from error
    from compressor.taylor.criteria import CRITERIA

    if p.taylor_criterion not in CRITERIA:
        raise RecipeError(f"[prune] taylor_criterion = {p.taylor_criterion!r}: use one of {', '.join(CRITERIA)}")
    if p.taylor_target not in ("params", "flops"):
        raise RecipeError(f"[prune] taylor_target = {p.taylor_target!r}: use params or flops")
    if recipe.pack.format not in PACK_FORMATS:
        raise RecipeError(f"[pack] format = {recipe.pack.format!r}: use one of {', '.join(PACK_FORMATS)}")
    bad = [f for f in recipe.export.formats if f not in EXPORT_FORMATS]
    if bad or not recipe.export.formats:
        raise RecipeError(f"[export] formats = {recipe.export.formats!r}: use onnx, tvm or both")
    if recipe.export.activations not in ("fp32", "int8"):
        raise RecipeError(f"[export] activations = {recipe.export.activations!r}: use fp32 or int8")
    if recipe.export.activations == "int8" and not recipe.pack.int8:
        raise RecipeError("[export] activations = 'int8' needs int8 weights: set [pack] int8 = true")
    from exporters.tvm_targets import TARGET_NAMES

    bad = [t for t in recipe.export.targets if t not in TARGET_NAMES]
    if bad:
        raise RecipeError(f"unknown target {bad[0]!r}: use one of {', '.join(TARGET_NAMES)}")
    if recipe.export.activations == "int8" and "tvm" in recipe.export.formats:
        from exporters.tvm_targets import compile_target
        from exporters.tvm_vnni_kernel import target_has_vnni

        lacking = [t for t in recipe.export.targets if not target_has_vnni(compile_target(t).target)]
        if lacking:
            raise RecipeError(f"[export] activations = 'int8' needs an x86 CPU with AVX-512 VNNI; target "
                              f"{lacking[0]!r} has none: set activations = 'fp32' or drop that target")
    if any(not isinstance(b, int) or b < 1 for b in recipe.check.batches) or recipe.check.threads < 1:
        raise RecipeError("[check] batches must be positive whole numbers and threads ≥ 1")
    if recipe.data.eval_limit < 1:
        raise RecipeError("[data] eval_limit must be ≥ 1")


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from TOML text (defaults for everything it leaves out)."""
    try:
        document = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError; too long a number; too deep a nesting
        raise RecipeError(f"{source} is not valid TOML ({error}): fix the syntax") from error
    recipe = Recipe()
    for section, body in document.items():
        if not isinstance(body, dict):
            raise RecipeError(f"{source}: {section!r} must be a [section], not a plain value")
        _section(recipe, section)  # an empty unknown section is a typo too
        for key, value in body.items():
            _set(recipe, section, key, value)
    validate(recipe)
    return recipe


def load_recipe(path: str | Path | None) -> Recipe:
    """The recipe in ``path``, or a shipped one by name (``default``, ``narang-gradual-90``, …),
    or the default recipe for ``None``."""
    if path is None:
        path = RECIPE_DIR / "default.toml"
    candidate = Path(path)
    if not candidate.exists() and (RECIPE_DIR / f"{path}.toml").exists():
        candidate = RECIPE_DIR / f"{path}.toml"
    if not candidate.exists():
        shipped = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
        raise RecipeError(f"recipe {path} not found: give a TOML file or a shipped recipe ({shipped})")
    return parse_recipe(candidate.read_text(), str(candidate))


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
