"""What an untrusted ``torch.export`` archive (``.pt2``) is checked for.

``torch.export.load`` (torch 2.14) runs code from the file in several ways,
pickles being only one of them:

* weights and constants whose config entry says ``"use_pickle": true``, and
  constants saved as ``custom_obj_*`` (TorchScript objects) or
  ``opaque_obj_*`` (plain pickles), are unpickled in full;
* every ``torch.save`` member (the sample inputs ``data/sample_inputs/*.pt``,
  the weights and constants of older archives, and the ``serialized_*.pt``
  of the oldest layout) is read with ``weights_only=True`` first and, if that
  fails, unpickled in full;
* compiled AOTInductor code (``data/aotinductor/``) is loaded as a shared
  library;
* shape expressions (``expr_str`` in the program's JSON) go through
  ``sympy.sympify``, which evaluates its text as Python (and computes a
  power of literals at once, however large);
* tree specs (``in_spec``/``out_spec``) of a ``defaultdict`` or with an enum
  import the module the file names;
* graph nodes may call ``_call_custom_autograd_function_in_pre_dispatch``,
  which imports a module named in the file and calls into it, and may take
  as arguments any function reachable from ``torch``, ``operator`` or
  ``math`` (``torch.export.save`` only writes operators there).

:func:`check_archive` reads the archive before ``torch.export.load`` sees
it and refuses the first five: a payload config that asks for unpickling, a
``torch.save`` member that ``torch.load(..., weights_only=True)`` (torch's
own first try, the same call) cannot read, so that torch never falls back,
compiled code, a shape expression that is anything but sympy constructors
of literals, a tree spec that imports. :func:`check_program` refuses the
last in the loaded program, before it runs; every other call in a loaded
graph is one torch's own verifier allows when the program is built (an
operator, or a builtin such as ``operator.add``). Member names are compared
without case, as torch's zip reader looks them up, and an archive with two
members of the same name is refused: the check and torch might read
different ones. ``--trust-pickle`` skips all of this.

:func:`check_layout`, run for every ``.pt2``, refuses a zip that is no
``torch.export`` archive at all (a TorchScript file named ``.pt2``).
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import zipfile
from collections import Counter
from collections.abc import Iterator

import torch
from torch.export.custom_ops import _call_custom_autograd_function_in_pre_dispatch

from ..errors import AuditError, short_reason

COMPILED_CODE_DIR = "data/aotinductor/"
PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")
TREESPEC_KEYS = ("in_spec", "out_spec")
IMPORTING_TREESPEC_TYPE = "collections.defaultdict"

SYMPY_CALLS = frozenset({
    # what sympy's srepr writes for the expressions of shapes
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Abs", "Max", "Min",
    "floor", "ceiling", "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan",
    "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    # torch's own sympy functions, as torch's deserializer lists them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
})
SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan"})
POWER_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
"""Calls whose second argument is an exponent: with literal operands sympy
computes them at once, so ``Pow(10, 10**18)`` would never finish loading."""
MAX_EXPONENT = 64
"""The largest literal exponent (or shift) taken, on a base with no power in it."""
NAMED_BY_TEXT = ("Symbol", "Float")
"""The only calls that take text (a symbol's name, a number's digits); any
other sympy function would ``sympify`` a text argument, running it."""
MAX_INFLATED_BYTES = 256 << 20
"""The most a compressed ``.json`` or ``.pt`` member may inflate to when it
is read for the checks. ``torch.export.save`` stores members uncompressed,
and they are small (a ResNet-50's program JSON is 0.4 MB, its sample inputs
1.2 MB; the weights are members it does not read here), so only an archive
repacked with compression meets this, and a zip bomb."""

OPERATOR_TYPES = (torch._ops.OpOverload, torch._ops.HigherOrderOperator)


def _refused(path: str, what: str) -> AuditError:
    return AuditError(
        f"model {path} contains {what} and was refused; pass --trust-pickle only if you trust its source"
    )


def _unreadable(path: str, why: str) -> AuditError:
    return AuditError(f"model {path}: not a readable torch.export program ({why})")


def _arguments(value) -> Iterator:
    """The values in a graph node's (nested) arguments."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _arguments(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arguments(item)
    else:
        yield value


def _dicts(value) -> Iterator[dict]:
    """Every dict in a JSON value, nested ones included."""
    if isinstance(value, dict):
        yield value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _dicts(item)


def _plain_sympy(node: ast.AST, text_allowed: bool = False) -> bool:
    """Whether a parsed ``expr_str`` is only sympy constructors of literals,
    as ``srepr`` writes them; ``text_allowed`` for the first argument of a
    :data:`NAMED_BY_TEXT` call."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (bool, int, float)) or (text_allowed and isinstance(node.value, str))
    if isinstance(node, ast.Name):
        return node.id in SYMPY_CONSTANTS
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd)) and _plain_sympy(node.operand)
    if isinstance(node, ast.Tuple):
        return all(_plain_sympy(item) for item in node.elts)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_CALLS:
            return False
        named = node.func.id in NAMED_BY_TEXT
        arguments_plain = all(
            _plain_sympy(arg, named and position == 0) for position, arg in enumerate(node.args)
        )
        options_plain = all(
            keyword.arg is not None and isinstance(keyword.value, ast.Constant)
            and isinstance(keyword.value.value, (bool, int))
            for keyword in node.keywords
        )
        return arguments_plain and options_plain and _bounded_power(node)
    return False


def _bounded_power(call: ast.Call) -> bool:
    """Whether a power in a shape expression is cheap to build: its exponent
    is symbolic (sympy leaves it unevaluated) or a literal of at most
    :data:`MAX_EXPONENT` on a base without powers, so no nesting of literal
    powers makes a number too large to compute."""
    if call.func.id not in POWER_CALLS or len(call.args) != 2:
        return True
    base, exponent = call.args
    if _calls(exponent, {"Symbol"}):
        return True
    literal = exponent.args[0] if isinstance(exponent, ast.Call) and len(exponent.args) == 1 else exponent
    try:
        value = ast.literal_eval(literal)
    except ValueError:  # not a plain number
        return False
    small = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_EXPONENT
    return small and not _calls(base, POWER_CALLS)


def _calls(node: ast.AST, names: frozenset[str] | set[str]) -> bool:
    """Whether ``node`` calls any of ``names`` anywhere inside it."""
    return any(
        isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id in names
        for inner in ast.walk(node)
    )


def _safe_expression(text) -> bool:
    """Whether ``sympy.sympify(text)`` only builds a shape expression (runs no other code)."""
    if not isinstance(text, str):
        return False
    try:
        return _plain_sympy(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _treespec_imports(text) -> bool:
    """Whether torch's pytree would import a module to rebuild the tree spec
    ``text``: a ``defaultdict`` (its factory) or an enum in a node's context."""
    try:
        _, schema = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return False  # torch cannot read it either
    for node in _dicts(schema):
        if node.get("type") == IMPORTING_TREESPEC_TYPE:
            return True
        try:
            context = json.loads(node.get("context"))
        except (TypeError, ValueError, RecursionError):
            continue
        if any("__enum__" in entry for entry in _dicts(context)):
            return True
    return False


def _check_json(document, member: str, path: str) -> None:
    """Refuse the program JSON or payload config ``document`` (the member
    ``member``) if loading it would unpickle or run code."""
    for node in _dicts(document):
        if node.get("use_pickle"):
            raise _refused(path, f"pickled tensors ({node.get('path_name')} in {member})")
        payload = node.get("path_name")
        if isinstance(payload, str) and payload.startswith(PICKLED_CONSTANT_PREFIXES):
            raise _refused(path, f"pickled objects ({payload} in {member})")
        if "expr_str" in node and not _safe_expression(node["expr_str"]):
            raise _refused(path, f"a shape expression that is Python code or too large to compute ({member})")
        if any(isinstance(node.get(key), str) and _treespec_imports(node[key]) for key in TREESPEC_KEYS):
            raise _refused(path, f"an input or output structure that imports Python modules ({member})")


def _check_torch_save(data: bytes, member: str, path: str) -> None:
    """Refuse a ``torch.save`` member that ``weights_only=True`` cannot load:
    torch would then unpickle it in full."""
    if not data:
        return  # torch reads an empty member as no data
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, f"pickled code/objects ({member})") from exc
    except Exception as exc:
        reason = short_reason(exc, 120)
        raise _refused(path, f"{member}, which only full unpickling might read ({reason})") from exc


def _read(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """The member ``name``, in memory. A compressed member that declares more
    than :data:`MAX_INFLATED_BYTES` is refused before it is read (a zip bomb
    of a few kB would otherwise fill the memory), and the read stops there in
    case the declaration lies; a stored member is a slice of the archive,
    which is in memory already, so it is read whatever its size."""
    info = archive.getinfo(name)
    compressed = info.compress_type != zipfile.ZIP_STORED
    if compressed and info.file_size > MAX_INFLATED_BYTES:
        raise _unreadable(
            path, f"{name} inflates to {info.file_size} bytes, more than the {MAX_INFLATED_BYTES >> 20} MiB allowed"
        )
    try:
        with archive.open(info) as member:
            return member.read(MAX_INFLATED_BYTES if compressed else -1)
    except Exception as exc:  # a damaged member: bad CRC, unknown compression, encryption
        raise _unreadable(path, f"{name}: {short_reason(exc)}") from exc


def check_layout(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse a zip archive that is no ``torch.export`` program, such as a
    TorchScript or ``torch.save`` file named ``.pt2``: torch would fail with
    an error that only points at the warnings it logged."""
    names = archive.namelist()
    if "archive_format" not in {name.partition("/")[2] for name in names} and "version" not in names:
        raise AuditError(
            f"model {path}: not a torch.export program (its archive has no archive_format record; "
            "a TorchScript or torch.save file must not be named .pt2)"
        )


def check_archive(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse the ``.pt2`` ``archive`` (of the model ``path``) if
    ``torch.export.load`` would unpickle or run code from it (see the module
    docstring); AuditError names what was found."""
    names = archive.namelist()
    folded = Counter(name.lower() for name in names)
    duplicate = next((name for name, count in folded.items() if count > 1), None)
    if duplicate is not None:
        raise _unreadable(path, f"two members named {duplicate}")
    for name in names:
        lower = name.lower()
        if lower.partition("/")[2].startswith(COMPILED_CODE_DIR):
            raise _refused(path, f"compiled AOTInductor code ({name})")
        if lower.endswith(".pt"):
            _check_torch_save(_read(archive, name, path), name, path)
        elif lower.endswith(".json"):
            try:
                document = json.loads(_read(archive, name, path))
            except (ValueError, RecursionError) as exc:
                raise _unreadable(path, f"{name} is not JSON") from exc
            _check_json(document, name, path)


def check_program(program: torch.export.ExportedProgram, path: str) -> None:
    """Refuse a loaded program whose graphs import code or take a function
    that is not an operator as an argument; run before the program is."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target is _call_custom_autograd_function_in_pre_dispatch:
                raise _refused(path, f"a graph node that imports Python modules ({node.name})")
            for value in _arguments((node.args, node.kwargs)):
                if callable(value) and not isinstance(value, OPERATOR_TYPES):
                    function = getattr(value, "__name__", value)
                    raise _refused(path, f"a graph node that calls {function} ({node.name})")
