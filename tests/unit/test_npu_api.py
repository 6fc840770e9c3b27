"""Static check of our Ascend code against the real torch_npu package (no NPU needed).

Every `torch_npu.*` and `torch.npu.*` attribute chain in our code (found with `ast`, so
docstrings and comments do not count), plus every function `backends/spec.py` calls on a
backend's device module, must exist in the source of the current torch_npu release, which
pip downloads into a cache. Resolution walks the package: a segment that is a submodule is
descended into; the first one that is not must be a name bound in that module (definition,
assignment, import, star-import followed, or an assignment onto the module from another file, as
`torch_npu/utils/custom_ops.py` binds the fused ops: `torch_npu.npu_rms_norm = torch.ops.npu...`);
attribute segments after it (attributes of an object,
such as `torch_npu.npu.config.allow_internal_format`) must at least occur as an identifier in
the package. The test is skipped, with the reason printed, only if the package index cannot
be reached.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("ppllava", "backends", "pipeline", "stages")
CACHE = Path.home() / ".cache" / "ppllava-pipeline" / "torch_npu"


def attribute_chains(source: str, roots: dict[str, str]) -> set[str]:
    """Dotted names in ``source`` whose base is one of ``roots`` (name -> canonical prefix)."""
    chains = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        parts, current = [], node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            continue
        parts.reverse()
        if current.id == "torch" and parts[:1] == ["npu"] and len(parts) > 1:
            chains.add("torch_npu.npu." + ".".join(parts[1:]))
        elif current.id in roots:
            chains.add(roots[current.id] + "." + ".".join(parts))
    # Keep only maximal chains: `a.b.c` makes `a.b` redundant.
    return {c for c in chains if not any(other.startswith(c + ".") for other in chains)}


def names_our_code_uses() -> set[str]:
    names = set()
    for directory in CODE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            names |= attribute_chains(path.read_text(), {"torch_npu": "torch_npu"})
    # The backend row calls these on `module = self.device_module()`, i.e. on torch.npu.
    names |= attribute_chains((REPO / "backends" / "spec.py").read_text(), {"module": "torch_npu.npu"})
    return names


class Package:
    """The Python sources of a wheel, with enough import resolution to find bound names."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        with zipfile.ZipFile(wheel) as archive:
            self.files = {n: archive.read(n).decode("utf-8", "replace") for n in archive.namelist() if n.endswith(".py")}
        self.identifiers = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(self.files.values())))
        # `torch_npu.name = ...` at the top level of any file of the package binds `name` on the package.
        self.assigned_onto: dict[str, set[str]] = {}
        for source in self.files.values():
            for module, name in re.findall(r"^(torch_npu)\.([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)", source, re.M):
                self.assigned_onto.setdefault(module, set()).add(name)

    def module_file(self, dotted: str) -> str | None:
        base = dotted.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.files:
                return candidate
        return None

    @lru_cache(maxsize=None)
    def bound_names(self, dotted: str) -> frozenset[str]:
        path = self.module_file(dotted)
        if path is None:
            return frozenset()
        tree = ast.parse(self.files[path])
        package = dotted if path.endswith("__init__.py") else dotted.rsplit(".", 1)[0]
        names: set[str] = set(self.assigned_onto.get(dotted, ())) if "." not in dotted else set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            elif isinstance(node, ast.Import):
                names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{parent}.{source}" if source else parent
                for alias in node.names:
                    if alias.name == "*":
                        names |= self.bound_names(source)
                    else:
                        names.add(alias.asname or alias.name)
        return frozenset(names)

    def missing(self, dotted: str) -> str | None:
        """None when ``dotted`` resolves, else the part that does not."""
        parts = dotted.split(".")
        module = parts[0]
        for index, part in enumerate(parts[1:], start=1):
            if self.module_file(f"{module}.{part}") is not None:
                module = f"{module}.{part}"
                continue
            if part not in self.bound_names(module):
                return f"{part!r} is not defined in {module}"
            for attribute in parts[index + 1 :]:
                if attribute not in self.identifiers:
                    return f"{attribute!r} (attribute of {'.'.join(parts[: index + 1])}) occurs nowhere in torch_npu"
            return None
        return None


def download_torch_npu() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("torch_npu-*.whl"))
    if wheels:
        return wheels[-1]
    command = [sys.executable, "-m", "pip", "download", "torch_npu", "--no-deps", "--only-binary", ":all:",
               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(CACHE), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted(CACHE.glob("torch_npu-*.whl"))
    if result.returncode != 0 or not wheels:
        message = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        reason = f"torch_npu could not be downloaded from the package index: {message[0]}"
        print(reason)
        pytest.skip(reason)
    return wheels[-1]


@pytest.fixture(scope="module")
def torch_npu_package() -> Package:
    return Package(download_torch_npu())


def test_our_code_uses_npu_names_at_all():
    names = names_our_code_uses()
    assert "torch_npu.npu.set_compile_mode" in names
    assert "torch_npu.npu.is_available" in names and "torch_npu.npu.max_memory_allocated" in names


def test_every_npu_name_we_use_exists_in_torch_npu(torch_npu_package):
    problems = {name: torch_npu_package.missing(name) for name in sorted(names_our_code_uses())}
    assert {name: why for name, why in problems.items() if why} == {}


def op_calls(source: str) -> list[tuple[str, int, set[str]]]:
    """(op, positional count, keywords) of every `torch_npu.<op>(...)` call in ``source``."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch_npu"):
            calls.append((node.func.attr, len(node.args), {k.arg for k in node.keywords if k.arg}))
    return calls


def meta_signature(package: Package, op: str) -> list[str] | None:
    """The parameters of the wheel's meta registration of ``op`` (`@impl(m, "op")`), which is the
    op's schema as torch_npu declares it to torch.compile and fake tensors."""
    for path, source in package.files.items():
        if not path.endswith("_meta_registrations.py"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and len(d.args) == 2 and isinstance(d.args[1], ast.Constant)
                    and d.args[1].value == op for d in node.decorator_list):
                return [a.arg for a in node.args.args]
    return None


def test_every_fused_op_call_matches_the_wheels_signature(torch_npu_package):
    calls = [call for directory in CODE_DIRS for path in sorted((REPO / directory).rglob("*.py"))
             for call in op_calls(path.read_text())]
    assert {op for op, _, _ in calls} >= {"npu_fusion_attention", "npu_rms_norm"}
    for op, positional, keywords in calls:
        parameters = meta_signature(torch_npu_package, op)
        assert parameters is not None, f"torch_npu has no meta registration for {op}"
        assert positional <= len(parameters) and keywords <= set(parameters[positional:]), (op, parameters)
    # the check itself: a keyword the op does not have is caught
    (_, positional, keywords), = op_calls("torch_npu.npu_rms_norm(x, w, eps=1e-6)")
    assert not keywords <= set(meta_signature(torch_npu_package, "npu_rms_norm")[positional:])


def test_the_limits_and_switches_we_rely_on_are_the_wheels(torch_npu_package):
    """backends/kernels.py's limits are those of the op docs shipped in the wheel; the allocator
    conflict, the CPU-fallback switch and the affinity force mode of docs/ascend.md are in its library."""
    docs = torch_npu_package.files["torch_npu/_op_plugin_docs.py"]
    attention = docs[docs.index("npu_fusion_attention(Tensor query"):][:20000]
    for fact in ("bool、uint8", "BNSS格式、B1SS格式、11SS格式、SS格式", "取值为1(或True)代表该位不参与计算",
                 "压缩下三角矩阵(2048*2048)", "取值范围1~768", "Nq取值范围1~256", "Nq/Nkv必须是非0整数",
                 "float16、bfloat16、float32"):
        assert fact in attention, fact
    rms_norm = docs[docs.index("torch_npu.npu_rms_norm(Tensor self"):][:1500]
    assert "2-8维" in rms_norm and "数据类型需要和self保持一致" in rms_norm
    with zipfile.ZipFile(torch_npu_package.wheel) as archive:
        library = archive.read("torch_npu/lib/libtorch_npu.so")
    for switch in (b"Both PYTORCH_NPU_ALLOC_CONF and PYTORCH_ALLOC_CONF have been set",
                   b"TORCH_NPU_FALLBACK_CPU_DISABLE", b"CPU_AFFINITY_CONF",
                   b"Thread affinity is already set. Use force:1", b"TASK_QUEUE_ENABLE should be 0, 1 or 2"):
        assert switch in library, switch


def test_the_check_catches_a_name_torch_npu_lacks(torch_npu_package):
    snippet = "import torch\ntorch.npu.definitely_not_an_api(0)\ntorch_npu.npu.config.no_such_switch = 1\n"
    names = attribute_chains(snippet, {"torch_npu": "torch_npu"})
    assert names == {"torch_npu.npu.definitely_not_an_api", "torch_npu.npu.config.no_such_switch"}
    assert "definitely_not_an_api" in torch_npu_package.missing("torch_npu.npu.definitely_not_an_api")
    assert "no_such_switch" in torch_npu_package.missing("torch_npu.npu.config.no_such_switch")
    assert torch_npu_package.missing("torch_npu.npu.set_compile_mode") is None


def test_no_global_monkeypatching_and_no_eager_import():
    for directory in CODE_DIRS:
        for path in (REPO / directory).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                # `from torch_npu.contrib import transfer_to_npu` (the documented form) names it as an alias.
                if isinstance(node, ast.ImportFrom) and node.module and (
                        "transfer_to_npu" in node.module or any("transfer_to_npu" in a.name for a in node.names)):
                    pytest.fail(f"{path}:{node.lineno} imports transfer_to_npu")
                if isinstance(node, ast.Call) and any(
                        isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "transfer_to_npu" in arg.value
                        for arg in node.args):
                    pytest.fail(f"{path}:{node.lineno} imports transfer_to_npu dynamically")
                if isinstance(node, ast.Import) and any("torch_npu" in a.name for a in node.names):
                    pytest.fail(f"{path}:{node.lineno} imports torch_npu at module level; use backends.npu's lazy import")
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch_npu":
                    pytest.fail(f"{path}:{node.lineno} imports from torch_npu; use backends.npu's lazy import")


def test_importing_our_packages_never_imports_torch_npu(tmp_path):
    """At run time, with an importable stand-in torch_npu on the path: importing every module of
    ppllava, backends, pipeline, pipeline.data and stages, and selecting the CPU row, makes no
    import of torch_npu from our code. (Third-party code may: with torch_npu installed,
    transformers -> accelerate imports it on `import transformers`; see docs/ascend.md.)"""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("")
    script = (
        "import builtins, importlib, pkgutil, sys\n"
        "callers = []\n"
        "real_import, real_import_module = builtins.__import__, importlib.import_module\n"
        "def spy(name, globals=None, *args, **kwargs):\n"
        "    if name.split('.')[0] == 'torch_npu':\n"
        "        callers.append((globals or {}).get('__file__') or '?')\n"
        "    return real_import(name, globals, *args, **kwargs)\n"
        "def spy_module(name, package=None):\n"
        "    if name.split('.')[0] == 'torch_npu':\n"
        "        callers.append(sys._getframe(1).f_code.co_filename)\n"
        "    return real_import_module(name, package)\n"
        "builtins.__import__, importlib.import_module = spy, spy_module\n"
        "import ppllava, backends, pipeline, pipeline.data, stages\n"
        "for package in (ppllava, backends, pipeline, pipeline.data, stages):\n"
        "    for module in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        real_import_module(module.name)\n"
        "backends.select('cpu')\n"
        "print(sorted(set(callers)))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    callers = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    ours = [c for c in callers if any(c.startswith(str(REPO / d) + os.sep) for d in CODE_DIRS)]
    assert ours == [], f"torch_npu imported at module import by {ours}"
