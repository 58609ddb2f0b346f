"""Record the parts of SGLang's API that ``rarl_fast.rollout.sglang`` calls, read from SGLang's SOURCE.

Nothing of SGLang is imported (its engine needs CUDA kernels this machine may not have): the Python files are
parsed with ``ast`` straight from a downloaded wheel or an installed copy. The record is a small JSON file that
``tests/test_rollout_sglang.py`` binds every call of our backend to (engine construction, generate, weight
update, memory release/resume, weight read-back) and from which it builds a fake engine with the same
signatures. Re-record when moving to another SGLang release, then run that test:

    pip download sglang==0.5.23 --no-deps -d /tmp/sgl
    python bench/record_sglang_api.py /tmp/sgl/sglang-0.5.23-*.whl        # or: --installed
    python -m pytest tests/test_rollout_sglang.py -q

What is recorded:
    engine_methods        every public method of ``sglang.Engine`` (sglang/srt/entrypoints/engine.py):
                          parameters as [name, kind, default source or null]
    engine_attributes     the attributes ``Engine.__init__`` sets (``self.<name> = ...``)
    server_args           the keyword arguments ``Engine(**kwargs)`` accepts (the ``ServerArgs`` fields)
    sampling_params       the keys of a request's ``sampling_params`` (``SamplingParams`` fields)
    check_weights         ``TokenizerManager.check_weights`` (the checksum read-back) and the fields of its
                          request ``CheckWeightsReqInput``
    tensor_hash           the parameters of ``sglang.srt.managers.mm_utils.tensor_hash`` (the checksum's hash)
    memory_tags           ``GPU_MEMORY_ALL_TYPES``, the tags of release/resume_memory_occupation
    qwen2_5_vl            the methods of SGLang's Qwen2.5-VL model and the stacked-parameter mapping of its
                          ``load_weights`` (which checkpoint names it fuses into which parameter)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "sglang_api.json"

ENGINE = "sglang/srt/entrypoints/engine.py"
SERVER_ARGS = "sglang/srt/server_args.py"
ARG_FIELDS = "sglang/srt/arg_groups/fields/"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
TOKENIZER_CONTROL = "sglang/srt/managers/tokenizer_control_mixin.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
MM_UTILS = "sglang/srt/managers/mm_utils.py"
CONSTANTS = "sglang/srt/constants.py"
QWEN2_5_VL = "sglang/srt/models/qwen2_5_vl.py"


def _reader(source: str) -> tuple[Callable[[str], str], Callable[[str], list[str]], str]:
    """(read a file by its path inside the package tree, list files under a folder, version) of a wheel or of
    an installed copy (``source == "installed"``)."""
    if source == "installed":
        spec = importlib.util.find_spec("sglang")  # finds the package without executing it
        if spec is None or spec.origin is None:
            raise SystemExit("sglang is not installed here; pass a wheel path instead")
        base = Path(spec.origin).parent.parent

        def read(path: str) -> str:
            return (base / path).read_text()

        def listdir(folder: str) -> list[str]:
            return sorted(str(p.relative_to(base)) for p in (base / folder).glob("*.py"))

        dist = sorted(base.glob("sglang-*.dist-info/METADATA"))
        metadata = dist[-1].read_text() if dist else ""
    else:
        wheel = zipfile.ZipFile(source)
        names = wheel.namelist()

        def read(path: str) -> str:
            return wheel.read(path).decode("utf-8")

        def listdir(folder: str) -> list[str]:
            return sorted(
                n for n in names if n.startswith(folder) and n.endswith(".py") and "/" not in n[len(folder) :]
            )

        meta = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = read(meta[0]) if meta else ""
    version = next((line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Version:")), "")
    if not version:
        raise SystemExit("no Version: line in sglang's dist-info METADATA")
    return read, listdir, version


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise SystemExit(f"class {name} not found")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise SystemExit(f"{cls.name}.{name} not found")


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef, *, drop_self: bool = True) -> list[list]:
    """[[name, kind, default source or None], ...] in signature order (``self`` dropped)."""
    a = fn.args
    positional = [(p, "positional_only") for p in a.posonlyargs] + [(p, "positional_or_keyword") for p in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [[p.arg, kind, None if d is None else ast.unparse(d)] for (p, kind), d in zip(positional, defaults)]
    if a.vararg is not None:
        out.append([a.vararg.arg, "var_positional", None])
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append([p.arg, "keyword_only", None if d is None else ast.unparse(d)])
    if a.kwarg is not None:
        out.append([a.kwarg.arg, "var_keyword", None])
    if drop_self and out and out[0][0] in ("self", "cls"):
        out = out[1:]
    return out


def _fields(cls: ast.ClassDef) -> dict[str, str | None]:
    """Annotated class-level fields (a dataclass / msgspec Struct): name -> default source (None: required)."""
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and not node.target.id.startswith("_"):
            out[node.target.id] = None if node.value is None else ast.unparse(node.value)
    return out


def _engine(read: Callable[[str], str]) -> tuple[dict[str, list], list[str]]:
    cls = _class(ast.parse(read(ENGINE)), "Engine")
    methods = {
        node.name: _params(node)
        for node in cls.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (not node.name.startswith("_") or node.name == "__init__")
    }
    init = _method(cls, "__init__")
    attrs = set()
    for node in ast.walk(init):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for t in targets:
            for elt in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(elt, ast.Attribute) and isinstance(elt.value, ast.Name) and elt.value.id == "self":
                    attrs.add(elt.attr)
    return methods, sorted(attrs)


def _server_args(read: Callable[[str], str], listdir: Callable[[str], list[str]]) -> dict[str, str | None]:
    """The fields of ``ServerArgs``: the namespaces listed in ``_INPUT_NAMESPACES`` plus its own annotations."""
    tree = ast.parse(read(SERVER_ARGS))
    listed = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
        ):
            listed = [elt.id for elt in node.value.elts]
    if listed is None:
        raise SystemExit("_INPUT_NAMESPACES not found in server_args.py")
    namespaces = {}
    for path in listdir(ARG_FIELDS):
        for node in ast.parse(read(path)).body:
            if isinstance(node, ast.ClassDef):
                namespaces[node.name] = node
    missing = [n for n in listed if n not in namespaces]
    if missing:
        raise SystemExit(f"namespaces not found under {ARG_FIELDS}: {missing}")
    fields: dict[str, str | None] = {}
    for name in listed:
        fields.update(_fields(namespaces[name]))
    fields.update(_fields(_class(tree, "ServerArgs")))
    return dict(sorted(fields.items()))


def _constant_list(tree: ast.Module, name: str) -> list[str]:
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = node.value
    if name not in values:
        raise SystemExit(f"{name} not found")
    return [ast.literal_eval(values[e.id] if isinstance(e, ast.Name) else e) for e in values[name].elts]


def _qwen2_5_vl(read: Callable[[str], str]) -> dict:
    cls = _class(ast.parse(read(QWEN2_5_VL)), "Qwen2_5_VLForConditionalGeneration")
    load = _method(cls, "load_weights")
    mapping = None
    for node in ast.walk(load):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "stacked_params_mapping" for t in node.targets
        ):
            mapping = ast.literal_eval(node.value)
    if mapping is None:
        raise SystemExit("stacked_params_mapping not found in Qwen2_5_VLForConditionalGeneration.load_weights")
    methods = sorted(n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return {"methods": methods, "stacked_params_mapping": [list(m) for m in mapping]}


def record(source: str) -> dict:
    read, listdir, version = _reader(source)
    methods, attrs = _engine(read)
    control = _class(ast.parse(read(TOKENIZER_CONTROL)), "TokenizerControlMixin")
    tensor_hash = next(
        n for n in ast.parse(read(MM_UTILS)).body if isinstance(n, ast.FunctionDef) and n.name == "tensor_hash"
    )
    return {
        "sglang": version,
        "engine_methods": methods,
        "engine_attributes": attrs,
        "server_args": _server_args(read, listdir),
        "sampling_params": _fields(_class(ast.parse(read(SAMPLING)), "SamplingParams")),
        "check_weights": {
            "method": _params(_method(control, "check_weights")),
            "request": _fields(_class(ast.parse(read(IO_STRUCT)), "CheckWeightsReqInput")),
        },
        "tensor_hash": _params(tensor_hash, drop_self=False),
        "memory_tags": _constant_list(ast.parse(read(CONSTANTS)), "GPU_MEMORY_ALL_TYPES"),
        "qwen2_5_vl": _qwen2_5_vl(read),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("wheel", nargs="?", help="a downloaded sglang wheel (.whl)")
    src.add_argument("--installed", action="store_true", help="read the installed sglang package instead")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    rec = record("installed" if args.installed else args.wheel)
    args.out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(
        f"sglang {rec['sglang']}: {len(rec['engine_methods'])} Engine methods, {len(rec['server_args'])} server args, "
        f"{len(rec['sampling_params'])} sampling params -> {args.out}"
    )


if __name__ == "__main__":
    main()
