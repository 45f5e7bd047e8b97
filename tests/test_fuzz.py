"""Fuzzing (hypothesis) of what reads outside input: recipe parsing, the packed formats and the
artifact loaders.  Every bad input ends in one specific exception with a one-line message (what is
wrong and how to fix it), never in an arbitrary crash; good input round-trips exactly.  The number
of examples is written on each test (``max_examples``)."""

import dataclasses
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.blocks import BlockShape
from compressor.packed_model import PackedFileError, PackingConfig, load_packed, pack_model, save_packed
from compressor.packing import FORMATS, pack
from compressor.taylor.criteria import CRITERIA
from exporters.onnx_compress import CANDIDATE_BLOCKS, compress_file
from exporters.tvm_targets import TARGET_NAMES
from pipeline.checkpoint import SAFETENSORS_DTYPES, CheckpointError, load_model, read_safetensors
from pipeline.recipe import (
    EXPORT_FORMATS,
    PACK_FORMATS,
    PRUNE_METHODS,
    RECIPE_DIR,
    Recipe,
    RecipeError,
    parse_recipe,
    validate,
)
from runtime_tests.onnxruntime_check import ArtifactError, session

from .models import Mixed

FACTORY = "tests.models:Mixed"  # the module of the fuzzed checkpoints and packed files: every prunable layer type
SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]


def assert_one_line(error: BaseException) -> None:
    text = str(error)
    assert text.strip() and len(text.splitlines()) == 1, repr(text)


# Damage done to a valid file: random bytes instead, cut at a fraction of its length, or bytes
# overwritten at fractions of its length (a third of them in the first or last 2 %: the headers).
positions = st.one_of(st.floats(0, 1, exclude_max=True), st.floats(0, 0.02), st.floats(0.98, 1, exclude_max=True))
damage = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)),
)


def damaged(valid: bytes, how: tuple) -> bytes:
    kind, arg = how
    if kind == "random":
        return arg
    if kind == "truncate":
        return valid[:int(arg * len(valid))]
    data = bytearray(valid)
    for at, byte in arg:
        data[int(at * len(data))] = byte
    return bytes(data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- recipes

SECTIONS = [f.name for f in dataclasses.fields(Recipe)]
KEYS = sorted({f.name for s in SECTIONS for f in dataclasses.fields(getattr(Recipe(), s))})
names = st.one_of(st.sampled_from(SECTIONS + KEYS), st.text(max_size=10))
scalars = st.one_of(st.text(max_size=12), st.integers(), st.sampled_from([0, -1, 1, 10**400]), st.floats(),
                    st.booleans())
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(names, inner, max_size=3), max_leaves=8)


def quoted(text: str) -> str:
    """A TOML basic string (or quoted key): JSON's escapes are TOML's."""
    return json.dumps(text, ensure_ascii=False)


def toml(value) -> str:
    """A TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    return "{" + ", ".join(f"{quoted(k)} = {toml(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict) -> str:
    """Plain keys first, then one [table] per dict value."""
    plain = [f"{quoted(k)} = {toml(v)}\n" for k, v in document.items() if not isinstance(v, dict)]
    tables = [f"[{quoted(k)}]\n" + "".join(f"{quoted(key)} = {toml(v)}\n" for key, v in body.items())
              for k, body in document.items() if isinstance(body, dict)]
    return "".join(plain) + "\n".join(tables)


def parses_or_refuses(text: str) -> None:
    """``parse_recipe(text)``: a recipe that validates, or a one-line :class:`RecipeError`."""
    try:
        recipe = parse_recipe(text)
    except RecipeError as error:
        assert_one_line(error)
    else:
        validate(recipe)


DEFAULT_TEXT = (RECIPE_DIR / "default.toml").read_text()


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=200),
                      st.tuples(st.integers(0, len(DEFAULT_TEXT)), st.integers(0, 20), st.text(max_size=8)).map(
                          lambda edit: DEFAULT_TEXT[:edit[0]] + edit[2] + DEFAULT_TEXT[edit[0] + edit[1]:])))
def test_any_text_parses_or_gives_a_recipe_error(text):
    parses_or_refuses(text)


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(names, st.one_of(st.dictionaries(names, toml_values, max_size=5), toml_values),
                                max_size=4))
def test_any_toml_document_parses_or_gives_a_recipe_error(document):
    parses_or_refuses(toml_document(document))


@pytest.mark.parametrize("text, message", [
    ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML"),  # deeper than Python's recursion limit
    ("a = " + "9" * 5000, "not valid TOML"),  # longer than Python's int-from-string limit
    ("[prune]\nsparsity = 1" + "0" * 400, "write a finite number"),  # beyond float
    ("[prune]\nlr = nan", "write a finite number"),
    ("[prune]\nlr = -1e-3", "positive learning rate"),
    ("[prune]\ninclude = '('", "not a regular expression"),
    ("[check]\nbatches = [true]", "list of whole numbers"),
    ("[data]\ninput_shapes = [1, 2]", "list of quoted strings"),
    ('["a\\nb"]', "unknown recipe section"),  # a newline in the name: still one line
])
def test_values_found_by_fuzzing_are_refused(text, message):
    with pytest.raises(RecipeError, match=message) as error:
        parse_recipe(text)
    assert_one_line(error.value)


@settings(max_examples=300, deadline=None)
@given(overrides=st.dictionaries(st.sampled_from([f"{s}__{k}" for s in SECTIONS for k in KEYS]) | st.text(max_size=12),
                                 st.one_of(toml_values, st.none(), st.binary(max_size=4)), max_size=4))
def test_any_override_applies_or_gives_a_recipe_error(overrides):
    try:
        recipe = Recipe().override(**overrides)
    except RecipeError as error:
        assert_one_line(error)
    else:
        validate(recipe)


plain_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=16)
VALID_VALUES = {
    "model": {"name": plain_text, "checkpoint": plain_text, "factory": plain_text, "trust_checkpoint": st.booleans()},
    "data": {"task": plain_text, "eval_limit": st.integers(1, 10**9), "input_shapes": st.lists(plain_text, max_size=3)},
    "prune": {"method": st.sampled_from(PRUNE_METHODS), "sparsity": st.floats(0, 1, exclude_max=True),
              "block": st.builds("{}x{}".format, st.integers(1, 64), st.integers(1, 64)),
              "steps": st.integers(0, 10**6), "lr": st.floats(1e-9, 10.0), "freq": st.integers(1, 1000),
              "include": st.sampled_from(["", r"^fc\.weight$", "conv|gru", r"layers\.\d+"]),
              "exclude": st.sampled_from(["", "bias", r"^embed"]), "taylor_criterion": st.sampled_from(CRITERIA),
              "taylor_target": st.sampled_from(["params", "flops"]),
              "taylor_step_fraction": st.floats(0, 1, exclude_min=True, exclude_max=True),
              "seed": st.integers(0, 2**32)},
    "pack": {"format": st.sampled_from(PACK_FORMATS), "int8": st.booleans()},
    "export": {"formats": st.lists(st.sampled_from(EXPORT_FORMATS), min_size=1, unique=True),
               "targets": st.lists(st.sampled_from(TARGET_NAMES), max_size=3), "device": plain_text},
    "check": {"batches": st.lists(st.integers(1, 256), max_size=4), "threads": st.integers(1, 64)},
}


@st.composite
def valid_settings(draw) -> dict[str, dict]:
    """Valid values for a random subset of the keys (the schedule's two fractions together, start < end)."""
    chosen: dict[str, dict] = {}
    for section, keys in VALID_VALUES.items():
        for key, values in keys.items():
            if draw(st.booleans()):
                chosen.setdefault(section, {})[key] = draw(values)
    if draw(st.booleans()):
        start, end = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2, unique=True)))
        chosen.setdefault("prune", {}).update(start_fraction=start, end_fraction=end)
    return chosen


@settings(max_examples=200, deadline=None)
@given(chosen=valid_settings())
def test_valid_values_read_back_from_toml_and_from_overrides(chosen):
    from_text = parse_recipe(toml_document(chosen))
    from_overrides = Recipe().override(**{f"{s}__{k}": v for s, body in chosen.items() for k, v in body.items()})
    for recipe in (from_text, from_overrides):
        for section, body in chosen.items():
            for key, value in body.items():
                assert getattr(getattr(recipe, section), key) == value, (section, key)


# ---------------------------------------------------------------- packed formats (beyond tests/test_packing.py)

degenerate_shapes = st.one_of(
    st.tuples(st.integers(1, 40)),  # 1-D (biases, gains)
    st.tuples(st.just(1), st.integers(1, 40)),  # 1×N
    st.tuples(st.integers(1, 40), st.just(1)),  # N×1
    st.lists(st.integers(0, 4), min_size=2, max_size=5).map(tuple),  # empty dimensions, 3-D to 5-D
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
)


@settings(max_examples=300, deadline=None)
@given(shape=degenerate_shapes, fill=st.sampled_from(["zeros", "full", "half"]), fmt=st.sampled_from(FORMATS),
       block=st.builds(BlockShape, st.integers(1, 9), st.integers(1, 9)), int8=st.booleans(),
       magnitude=st.integers(-20, 20), seed=st.integers(0, 2**32 - 1))
def test_degenerate_weights_round_trip_and_pass_their_own_check(shape, fill, fmt, block, int8, magnitude, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(shape) * 10.0 ** magnitude).astype(np.float32)
    weight[weight == 0] = 1  # "full" means no zero at all
    if fill != "full":
        weight[rng.random(shape) < (1.0 if fill == "zeros" else 0.5)] = 0
    packed = pack(weight, fmt, block, "int8" if int8 else "fp32")
    packed.check()  # the loader's validation accepts everything pack writes
    back = packed.to_dense()
    assert back.dtype == np.float32 and back.shape == weight.shape
    if not int8:
        assert np.array_equal(back, weight)
        return
    assert np.all(back[weight == 0] == 0)
    matrix, restored = weight.reshape(packed.matrix_shape), back.reshape(packed.matrix_shape)
    step = packed.arrays["scales"][:, None]
    assert np.all(np.abs(matrix - restored) <= step / 2 * (1 + 1e-4) + 1e-7 * np.abs(matrix).max(initial=0))


@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(st.integers(1, 8), st.integers(1, 8)), special=st.sampled_from([np.nan, np.inf, -np.inf]),
       fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**16))
def test_non_finite_weights_round_trip_in_fp32_and_are_refused_in_int8(shape, special, fmt, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(np.float32)
    weight[rng.random(shape) < 0.4] = 0
    weight.flat[rng.integers(weight.size)] = special
    assert np.array_equal(pack(weight, fmt, BlockShape(2, 1)).to_dense(), weight, equal_nan=True)
    with pytest.raises(ValueError, match="inf or NaN") as error:
        pack(weight, fmt, BlockShape(2, 1), "int8")
    assert_one_line(error.value)


def test_scalars_are_refused():
    with pytest.raises(ValueError, match="scalar"):
        pack(np.float32(3), "csr")


# ---------------------------------------------------------------- compressed ONNX initializers

def identity_model(array: np.ndarray) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", elem, list(array.shape))],
                              [numpy_helper.from_array(array, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@st.composite
def block_sparse_tensors(draw) -> np.ndarray:
    """fp32 or int8 tensors of 1 to 4 dimensions (sizes 1 included) whose zeros come in random
    r×c blocks of either matrix view, at any sparsity from none to all; fp32 ones sometimes hold
    NaN, ±inf, -0.0, subnormals and the largest floats."""
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=4)))
    numel = math.prod(shape)
    view = draw(st.sampled_from([(shape[0], numel // shape[0]) if len(shape) > 1 else (1, numel),
                                 (numel // shape[-1], shape[-1])]))
    r, c = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    sparsity = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keep = rng.random((-(-view[0] // r), -(-view[1] // c))) >= sparsity
    mask = np.repeat(np.repeat(keep, r, 0), c, 1)[:view[0], :view[1]]
    values = rng.standard_normal(view) * 50
    if draw(st.booleans()):
        array = np.clip(np.rint(values), -128, 127).astype(np.int8)
    else:
        array = values.astype(np.float32)
        if draw(st.booleans()):
            specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, np.finfo(np.float32).max], np.float32)
            picks = rng.random(view) < 0.2
            array[picks] = rng.choice(specials, int(picks.sum()))
    return np.where(mask, array, np.zeros_like(array)).reshape(shape)


@settings(max_examples=100, deadline=None, suppress_health_check=SUPPRESS)
@given(array=block_sparse_tensors(), coo=st.booleans(),
       block=st.one_of(st.none(), st.sampled_from(CANDIDATE_BLOCKS),
                       st.builds(BlockShape, st.integers(1, 7), st.integers(1, 7))))
@example(array=np.array(3.0, np.float32), coo=True, block=None)  # a scalar initializer
def test_compressed_onnx_initializers_come_back_exactly(array, coo, block, workdir):
    source, destination = workdir / "plain.onnx", workdir / "compressed.onnx"
    onnx.save(identity_model(array), str(source))
    report = compress_file(source, destination, min_sparsity=0.0, min_numel=1, block=block, coo=coo)
    assert len(report) == int(array.ndim > 0 and bool((array != 0).any()))  # all-zero tensors and scalars stay
    (actual,) = session(destination).run(None, {})
    nonzero = array != 0  # every non-zero (NaN included) comes back bit for bit; a -0.0 may come back as 0.0
    assert actual.dtype == array.dtype and actual.shape == array.shape
    assert actual[nonzero].tobytes() == array[nonzero].tobytes() and np.all(actual[~nonzero] == 0)


# ---------------------------------------------------------------- packed weights (.npz)

PACKINGS = [(fmt, dtype) for fmt in FORMATS for dtype in ("fp32", "int8")]


@pytest.fixture(scope="module")
def packed_files(workdir) -> dict[tuple[str, str], bytes]:
    """The bytes of ``save_packed`` of the pruned Mixed model in every format and value type."""
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(torch.rand_like(parameter) > 0.6)
    files = {}
    for fmt, dtype in PACKINGS:
        config = PackingConfig(format=fmt, block=BlockShape(2, 2) if fmt in ("bsr", "bitmask") else None, dtype=dtype)
        files[fmt, dtype] = save_packed(pack_model(model, config), workdir / f"{fmt}-{dtype}.npz").read_bytes()
    return files


def loads_or_refuses(path: Path) -> None:
    """``load_packed`` gives the Mixed model with weights of its shapes, or a one-line PackedFileError."""
    try:
        packed = load_packed(path, Mixed())
    except PackedFileError as error:
        assert_one_line(error)
        return
    params = dict(packed.module.named_parameters())
    for name, weight in packed.weights.items():
        assert weight.format in FORMATS and weight.dtype in ("fp32", "int8")
        weight.check()
        assert weight.to_dense().shape == tuple(params[name].shape)


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(packing=st.sampled_from(PACKINGS), how=damage)
def test_damaged_packed_files_load_or_give_a_packed_file_error(packing, how, packed_files, workdir):
    path = workdir / "damaged.npz"
    path.write_bytes(damaged(packed_files[packing], how))
    loads_or_refuses(path)


any_arrays = hnp.arrays(st.sampled_from([np.float32, np.int8, np.uint8, np.int64, np.float64, np.bool_,
                                         np.dtype(">f4"), np.dtype("<U2")]),
                        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
metas = st.one_of(json_values, st.fixed_dictionaries({
    "shape": st.lists(st.integers(-2, 8), max_size=4), "format": st.sampled_from(FORMATS) | st.text(max_size=4),
    "dtype": st.sampled_from(["fp32", "int8"]) | json_scalars, "block": st.lists(st.integers(-1, 4), max_size=3)}))
mutations = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("replace"), st.integers(0, 99), any_arrays),
    st.tuples(st.just("poke"), st.integers(0, 99), st.integers(0, 999), st.integers(-2**31, 2**31)),
    st.tuples(st.just("meta"), st.integers(0, 99), metas),
    st.tuples(st.just("add"), st.text(st.characters(codec="ascii", categories=("L", "N", "P")), min_size=1,
                                      max_size=12), any_arrays),
)


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(packing=st.sampled_from(PACKINGS), changes=st.lists(mutations, min_size=1, max_size=3))
@example(packing=("dense", "int8"), changes=[("replace", 0, np.zeros(2, np.float32))])
def test_malformed_packed_arrays_load_or_give_a_packed_file_error(packing, changes, packed_files, workdir):
    with np.load(io.BytesIO(packed_files[packing])) as data:
        arrays = {key: data[key] for key in data.files}
    for kind, *args in changes:
        keys = sorted(arrays)
        key = keys[args[0] % len(keys)] if keys and kind != "add" else None
        if kind == "drop" and key:
            del arrays[key]
        elif kind in ("replace", "add") and (key or kind == "add"):
            arrays[args[0] if kind == "add" else key] = args[-1]
        elif kind == "poke" and key and arrays[key].size:
            flat = arrays[key].reshape(-1).copy()
            flat[args[1] % flat.size] = np.array(args[2]).astype(flat.dtype)
            arrays[key] = flat.reshape(arrays[key].shape)
        elif kind == "meta" and key:
            metas_keys = [k for k in keys if k.endswith("/__meta__")]
            arrays[metas_keys[args[0] % len(metas_keys)] if metas_keys else key] = np.frombuffer(
                json.dumps(args[1]).encode(), np.uint8)
    path = workdir / "malformed.npz"
    np.savez(path, **arrays)
    loads_or_refuses(path)


# ---------------------------------------------------------------- checkpoints (.pt, .safetensors, .pt2)

def loads_model_or_refuses(path: Path, trust: bool = False) -> None:
    try:
        module, _ = load_model(str(path), factory=FACTORY, trust_checkpoint=trust)
    except CheckpointError as error:
        assert_one_line(error)
        return
    assert isinstance(module, nn.Module)


@pytest.fixture(scope="module")
def state_dict_file() -> bytes:
    buffer = io.BytesIO()
    torch.save(Mixed().state_dict(), buffer)
    return buffer.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(how=damage)
@example(how=("random", b"\x80\x02garbage"))  # a pickle stream the safe unpickler stops in: corrupt, not code
def test_damaged_state_dicts_load_or_give_a_checkpoint_error(how, state_dict_file, workdir):
    path = workdir / "damaged.pt"
    path.write_bytes(damaged(state_dict_file, how))
    loads_model_or_refuses(path)


def test_a_corrupt_or_unimportable_trusted_pickle_gives_a_checkpoint_error(workdir):
    path = workdir / "trusted.pt"
    for data in (b"\x80\x02cno_such_module\nbuild\nq\x00)\x81q\x01.",  # imports a module that does not exist
                 b"\x80\x02cbuiltins\nlen\nq\x00"):  # cut short after a GLOBAL
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="pickled code"):
            load_model(str(path), factory=FACTORY)
        with pytest.raises(CheckpointError, match="cannot be unpickled") as error:
            load_model(str(path), factory=FACTORY, trust_checkpoint=True)
        assert_one_line(error.value)


def test_state_dicts_with_other_keys_give_a_checkpoint_error(workdir):
    path = workdir / "keys.pt"
    torch.save({1: torch.zeros(2), "0.weight": torch.zeros(5, 7)}, path)
    with pytest.raises(CheckpointError, match="unexpected 1") as error:
        load_model(str(path), factory=FACTORY)
    assert_one_line(error.value)


def safetensors_bytes(header, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


entries = st.one_of(json_values, st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "F8_E4M3", "U16"]), json_values),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 24), st.integers()), max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-8, 100), st.integers()), min_size=2, max_size=2),
                              json_values)}))


@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
@given(header=st.one_of(st.dictionaries(st.text(max_size=6), entries, max_size=4), json_values),
       body=st.binary(max_size=100), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
@example(header={"w": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}, body=b"", length=None)
@example(header={"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, body=bytes(8), length=None)
@example(header={"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, body=bytes(8), length=None)
@example(header={"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, body=bytes(8), length=None)
@example(header={"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 8]}}, body=bytes(8), length=None)
@example(header={"w": [1, 2]}, body=b"", length=None)
@example(header=[1], body=b"", length=None)
def test_any_safetensors_header_reads_or_gives_a_checkpoint_error(header, body, length, workdir):
    path = workdir / "fuzzed.safetensors"
    path.write_bytes(safetensors_bytes(header, body, length))
    try:
        tensors = read_safetensors(path)
    except CheckpointError as error:
        assert_one_line(error)
        return
    for name, tensor in tensors.items():  # read only as declared
        start, end = header[name]["data_offsets"]
        assert list(tensor.shape) == header[name]["shape"] and 0 <= start <= end
        assert tensor.numel() * tensor.element_size() == end - start


tensor_specs = st.tuples(st.sampled_from(list(SAFETENSORS_DTYPES)), st.lists(st.integers(0, 5), max_size=3),
                         st.integers(0, 2**32 - 1))  # dtype, shape, seed of the bytes


@settings(max_examples=100, deadline=None)
@given(tensors=st.dictionaries(st.text(max_size=8).filter(lambda name: name != "__metadata__"), tensor_specs,
                               max_size=4), metadata=st.booleans())
def test_valid_safetensors_read_back_bit_exactly(tensors, metadata, workdir):
    header, blobs, offset = {"__metadata__": {"format": "pt"}} if metadata else {}, [], 0
    for name, (dtype, shape, seed) in tensors.items():
        itemsize = 2 if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        raw = np.random.default_rng(seed).integers(0, 256 if dtype != "BOOL" else 2, math.prod(shape) * itemsize,
                                                   dtype=np.uint8).tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    path = workdir / "valid.safetensors"
    path.write_bytes(safetensors_bytes(header, b"".join(blobs)))
    read = read_safetensors(path)
    assert list(read) == list(tensors)
    for (name, (dtype, shape, _)), raw in zip(tensors.items(), blobs, strict=True):
        tensor = read[name]
        assert list(tensor.shape) == shape
        assert (tensor.view(torch.int16) if dtype == "BF16" else tensor).numpy().tobytes() == raw


@pytest.fixture(scope="module")
def safetensors_file() -> bytes:
    """Mixed's state_dict as safetensors (float32 weights, an int64 BatchNorm counter)."""
    state = Mixed().state_dict()
    header, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "I64" if tensor.dtype == torch.int64 else "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(header, b"".join(t.numpy().tobytes() for t in state.values()))


@settings(max_examples=100, deadline=None, suppress_health_check=SUPPRESS)
@given(how=damage)
def test_damaged_safetensors_load_or_give_a_checkpoint_error(how, safetensors_file, workdir):
    path = workdir / "damaged.safetensors"
    path.write_bytes(damaged(safetensors_file, how))
    loads_model_or_refuses(path)


@pytest.fixture(scope="module")
def exported_program_file(workdir) -> bytes:
    path = workdir / "program.pt2"
    torch.export.save(torch.export.export(nn.Linear(7, 5), (torch.randn(1, 7),)), str(path))
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS)
@given(how=damage)
def test_damaged_exported_programs_load_or_give_a_checkpoint_error(how, exported_program_file, workdir):
    path = workdir / "damaged.pt2"
    path.write_bytes(damaged(exported_program_file, how))
    loads_model_or_refuses(path)


# ---------------------------------------------------------------- ONNX and TVM artifacts

@pytest.fixture(scope="module")
def onnx_file() -> bytes:
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    weight[np.random.default_rng(1).random(weight.shape) < 0.8] = 0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(weight, "w")])
    from exporters.onnx_compress import compress_initializers

    model, _ = compress_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 0.0, 1)
    return model.SerializeToString()


@settings(max_examples=150, deadline=None, suppress_health_check=SUPPRESS)
@given(how=damage)
def test_damaged_onnx_models_load_or_give_an_artifact_error(how, onnx_file, workdir):
    path = workdir / "damaged.onnx"
    path.write_bytes(damaged(onnx_file, how))
    try:
        session(path)
    except ArtifactError as error:
        assert_one_line(error)


def test_the_undamaged_files_load(state_dict_file, safetensors_file, exported_program_file, packed_files, onnx_file,
                                  workdir):
    """The fuzzed files start out valid."""
    for name, data in (("ok.pt", state_dict_file), ("ok.safetensors", safetensors_file), ("ok.pt2", exported_program_file)):
        (workdir / name).write_bytes(data)
        assert isinstance(load_model(str(workdir / name), factory=FACTORY)[0], nn.Module)
    for data in packed_files.values():
        (workdir / "ok.npz").write_bytes(data)
        load_packed(workdir / "ok.npz", Mixed())
    (workdir / "ok.onnx").write_bytes(onnx_file)
    session(workdir / "ok.onnx")


def test_missing_onnx_model_gives_an_artifact_error(workdir):
    with pytest.raises(ArtifactError, match="not a file"):
        session(workdir / "absent.onnx")


@pytest.fixture(scope="module")
def tvm_library(workdir) -> Path:
    pytest.importorskip("tvm")
    from exporters.tvm import export_tvm

    return Path(export_tvm(nn.Linear(4, 3).eval(), (torch.randn(1, 4),), workdir / "linear.so").path)


# Only damage that is refused before dlopen is loaded in this process: dlopen maps a truncated
# library and dies of SIGBUS (now refused by check_library); one with overwritten bytes can still
# abort ld.so, so bit flips are fuzzed on check_library alone.
@settings(max_examples=100, deadline=None, suppress_health_check=SUPPRESS)
@given(how=st.one_of(st.tuples(st.just("random"), st.binary(max_size=300).filter(lambda b: b[:4] != b"\x7fELF")),
                     st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True))))
def test_truncated_or_foreign_tvm_libraries_give_an_artifact_error(how, tvm_library, workdir):
    from runtime_tests.tvm_check import load_vm

    path = workdir / "damaged.so"
    path.write_bytes(damaged(tvm_library.read_bytes(), how))
    with pytest.raises(ArtifactError) as error:
        load_vm(path)
    assert_one_line(error.value)


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(how=st.one_of(st.tuples(st.just("random"), st.binary(min_size=60, max_size=300).map(lambda b: b"\x7fELF" + b)),
                     st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 0.05), st.integers(0, 255)),
                                                         min_size=1, max_size=8))))
def test_elf_check_refuses_or_accepts_any_header(how, tvm_library, workdir):
    from runtime_tests.tvm_check import check_library

    path = workdir / "header.so"
    path.write_bytes(damaged(tvm_library.read_bytes(), how))
    try:
        check_library(path)
    except ArtifactError as error:
        assert_one_line(error)


def test_tvm_library_loads_and_non_libraries_are_refused(tvm_library, workdir):
    import tvm

    from runtime_tests.tvm_check import load_vm, run_vm

    (out,) = run_vm(load_vm(tvm_library), [np.ones((1, 4), np.float32)], tvm.cpu())
    assert out.shape == (1, 3)
    for path, message in ((workdir / "absent.so", "cannot be read"), (workdir, "cannot be read")):
        with pytest.raises(ArtifactError, match=message):
            load_vm(path)
