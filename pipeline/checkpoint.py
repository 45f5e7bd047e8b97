"""Loading the model a user hands over, without ever running untrusted code by default.

- a shipped checkpoint name (``ds2-mini-digits``; see ``compress-and-export zoo``);
- a ``state_dict``: ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``, or
  ``.safetensors`` (read here: an 8-byte little-endian header length, a JSON header, raw
  little-endian tensors); the module comes from a zoo name or a factory;
- a ``torch.export`` program (``.pt2``): its graph module, with Linear / Conv / recurrent calls turned back
  into ``torch.nn`` layers (:func:`pipeline.program.module_from_program`)
  for one-shot pruning without training;
- a fully pickled ``nn.Module`` only with ``trust_checkpoint=True``: unpickling runs code.

A factory is ``"package.module:function"`` or ``"path/to/file.py:function"``; it returns the
module, or ``(module, example_inputs)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pickletools
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.zoo import MODELS, build_model
from compressor.zoo.pretrained import RECIPES, load_pretrained

from .program import module_from_program


class CheckpointError(ValueError):
    """A checkpoint or model that cannot be loaded; the message names the problem and the fix."""


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (:class:`CheckpointError` if its header or body is malformed)."""
    data = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not a safetensors file (bad header: {error}): re-save it with safetensors") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object): re-save it with "
                              "safetensors")
    body = memoryview(data)[8 + length:]
    return {name: _safetensor(path, name, info, body) for name, info in header.items() if name != "__metadata__"}


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensor(path: Path, name: str, info: Any, body: memoryview) -> torch.Tensor:
    """One tensor of a safetensors body, once its header entry is checked against the body."""
    def malformed(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} {problem}: re-save the file with safetensors")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise malformed("has no dtype, shape and data_offsets in the header")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}: convert it to one of "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(map(_is_size, shape)):
        raise malformed(f"has shape {shape!r}, not a list of sizes ≥ 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)) or offsets[0] > offsets[1]:
        raise malformed(f"has data_offsets {offsets!r}, not [start, end] with 0 ≤ start ≤ end")
    start, end = offsets
    if end > len(body):
        raise CheckpointError(f"{path} is truncated ({name!r} ends at byte {end} of {len(body)}): copy the file again")
    itemsize = 2 if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if math.prod(shape) * itemsize != end - start or math.prod(max(d, 1) for d in shape) * itemsize >= 2**63:
        raise malformed(f"of shape {shape} and dtype {dtype} does not fit its {end - start} bytes")
    if dtype == "BF16":  # numpy has no bfloat16: reinterpret the 16-bit patterns (NaN payloads included)
        return torch.from_numpy(np.frombuffer(body[start:end], np.int16).reshape(shape).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(body[start:end], SAFETENSORS_DTYPES[dtype]).reshape(shape).copy())


def load_factory(spec: str) -> Callable[..., Any]:
    """``"module.path:function"`` or ``"file.py:function"`` → the function."""
    target, _, function = spec.rpartition(":")
    if not target or not function:
        raise CheckpointError(f"--model {spec!r}: write module.path:factory or path/to/file.py:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise CheckpointError(f"--model {spec!r}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise CheckpointError(f"--model {spec!r}: cannot import {target} ({error}): check the module path") from error
    if not hasattr(module, function):
        raise CheckpointError(f"--model {spec!r}: {target} has no function {function}")
    return getattr(module, function)


def build_module(name: str, factory: str) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    """The (untrained) module from a factory or a zoo name, and the factory's example inputs if any."""
    if factory:
        built = load_factory(factory)()
        module, examples = (built[0], tuple(built[1])) if isinstance(built, tuple) else (built, None)
        if not isinstance(module, nn.Module):
            raise CheckpointError(f"the factory {factory} returned {type(module).__name__}, not an nn.Module")
        return module, examples
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r}: give a zoo name ({', '.join(sorted(MODELS))}) or --model module:factory")
    return build_model(name), None


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)`` with every mismatch listed in one error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}" if missing else "",
                 f"unexpected {', '.join(map(repr, unexpected[:8]))}{' …' if len(unexpected) > 8 else ''}"
                 if unexpected else "",
                 f"shape mismatch {'; '.join(shapes[:8])}" if shapes else ""]
        raise CheckpointError(f"{source} does not match the model ({'; '.join(p for p in parts if p)}): "
                              "build the model it was saved from (--model / the recipe's [model])")
    module.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()})


def _holds_code(path: Path, error: Exception) -> bool:
    """Whether ``torch.load(path, weights_only=True)`` failed with ``error`` because the file imports
    code (a class or function), rather than because it is corrupt: the safe unpickler names the
    global it refused, or the file is a plain pickle whose opcodes import globals (read with
    ``pickletools``, which executes nothing)."""
    if "Unsupported global" in str(error):
        return True
    try:
        with path.open("rb") as file:
            return any(opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST") for opcode, _, _ in pickletools.genops(file))
    except Exception:  # noqa: BLE001 - not a readable pickle stream at all
        return False


def load_model(checkpoint: str, name: str = "", factory: str = "", trust_checkpoint: bool = False
               ) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    """The model (eval mode) and the factory's example inputs, if it gave any (see the module docstring)."""
    if checkpoint in RECIPES and not Path(checkpoint).exists():
        return load_pretrained(checkpoint), None
    if not checkpoint:
        module, examples = build_module(name, factory)
        return module.eval(), examples
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {checkpoint} not found: give a file or a shipped checkpoint "
                              f"({', '.join(sorted(RECIPES))})")
    if path.suffix == ".pt2":
        try:
            return module_from_program(torch.export.load(str(path))), None
        except Exception as error:
            raise CheckpointError(f"{path} is not a torch.export program ({type(error).__name__}): save it with "
                                  "torch.export.save") from error
    if path.suffix == ".safetensors":
        state: Any = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            if not _holds_code(path, error):
                raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}): copy or save it again"
                                      ) from error
            if not trust_checkpoint:
                raise CheckpointError(f"{path} holds pickled code (a whole module), which is not loaded by default: "
                                      "save model.state_dict() instead, or pass --trust-checkpoint if you trust "
                                      "the file") from error
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as trusted_error:  # unpickling runs the file's code: anything can fail
                reason = (str(trusted_error).strip().splitlines() or [""])[0]
                raise CheckpointError(f"{path} cannot be unpickled ({type(trusted_error).__name__}: {reason}): "
                                      "make the code it was saved with importable, or save model.state_dict() "
                                      "instead") from trusted_error
    if isinstance(state, nn.Module):
        return state.eval(), None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict (a mapping of names to tensors): save model.state_dict()")
    module, examples = build_module(name, factory)
    load_state(module, state, str(path))
    return module.eval(), examples


def load_recipe_model(section) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    """:func:`load_model` from a recipe's ``[model]`` section."""
    return load_model(section.checkpoint, section.name, section.factory, section.trust_checkpoint)
