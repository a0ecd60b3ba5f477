"""Every config path an error message names exists in the config tree.

The messages are read from the source with ``ast``: the string parts of every
``raise SomeError(...)`` in ``hetlora/**/*.py``. Names in a message (``{x}``
of an f-string) are followed within the module to the strings they can hold:
local assignments, parameter defaults and the arguments of the module's own
calls to that function, so ``_require_path(p, "data_dir", ...)`` with
``f"config.data.source_kwargs.{field}"`` is checked as
``data.source_kwargs.data_dir``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import pkgutil
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hetlora"
CONFIGS = ROOT / "configs"

SECTIONS = ("model", "data", "lora", "method", "client", "server", "eval")
PATH_RE = re.compile(r"\b(?:%s)\.[a-z_](?:[a-z0-9_.]*[a-z0-9_])?" % "|".join(SECTIONS))
HINT_RE = re.compile(r"=|must|choose|set", re.IGNORECASE)
FILE_SUFFIXES = {"json", "jsonl", "csv", "tsv", "txt", "safetensors", "gguf", "bin", "msgpack", "npz", "npy",
                 "pkl", "png", "md", "py"}
UNKNOWN = "{}"          # stands for a value the extractor cannot know
MAX_VARIANTS = 64       # message variants per expression before giving up on a product


# ----------------------------------------------------------------------------- extractor


@dataclasses.dataclass(frozen=True)
class Message:
  """One possible text of one raise: ``where`` is ``file:line``."""
  where: str
  text: str

  def paths(self) -> list[str]:
    """The config paths the text names: not file names (``model.safetensors``), module paths
    (``hetlora.data.sources``; ``config.data.x`` is a path), nor code after ``=`` (``local=method.local``)."""
    out = []
    for m in PATH_RE.finditer(self.text):
      before = self.text[:m.start()]
      if m.group().rsplit(".", 1)[1] in FILE_SUFFIXES or before.endswith("="):
        continue
      if before.endswith(".") and not re.search(r"(?:^|[^\w.])config\.$", before):
        continue
      out.append(m.group())
    return out


class _Module:
  """String values of expressions in one module, by a small intra-module data flow."""

  def __init__(self, tree: ast.Module):
    self.tree = tree
    self.parent: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
      for child in ast.iter_child_nodes(node):
        self.parent[child] = node
    self.functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        self.functions.setdefault(node.name, []).append(node)
    self.calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    self._active: set[tuple[int, str]] = set()

  def scope(self, node: ast.AST) -> ast.AST:
    """The innermost function around ``node``, else the module."""
    while node in self.parent:
      node = self.parent[node]
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return node
    return self.tree

  def values(self, expr: ast.AST | None, scope: ast.AST) -> set[str]:
    if expr is None:
      return {UNKNOWN}
    if isinstance(expr, ast.Constant):
      return {expr.value} if isinstance(expr.value, str) else {UNKNOWN}
    if isinstance(expr, ast.JoinedStr):
      return self._concat([self.values(v, scope) for v in expr.values])
    if isinstance(expr, ast.FormattedValue):
      vals = self.values(expr.value, scope)
      if expr.conversion == ord("r"):
        vals = {v if v == UNKNOWN else repr(v) for v in vals}
      return vals
    if isinstance(expr, ast.BinOp):
      if isinstance(expr.op, ast.Add):
        return self._concat([self.values(expr.left, scope), self.values(expr.right, scope)])
      return self.values(expr.left, scope)   # "..." % args: the template
    if isinstance(expr, ast.IfExp):
      return self._cap(self.values(expr.body, scope) | self.values(expr.orelse, scope))
    if isinstance(expr, ast.BoolOp):
      return self._cap(set().union(*(self.values(v, scope) for v in expr.values)))
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "format":
      return self.values(expr.func.value, scope)
    if isinstance(expr, ast.Name):
      return self._name(expr.id, scope)
    return {UNKNOWN}   # calls, containers, attributes: opaque

  def _cap(self, vals: set[str]) -> set[str]:
    return vals if len(vals) <= MAX_VARIANTS else {UNKNOWN}

  def _concat(self, parts: list[set[str]]) -> set[str]:
    n = 1
    for p in parts:
      n *= len(p)
    if n > MAX_VARIANTS:
      parts = [p if len(p) == 1 else {UNKNOWN} for p in parts]
    return {"".join(t) for t in itertools.product(*parts)}

  def _name(self, name: str, scope: ast.AST) -> set[str]:
    key = (id(scope), name)
    if key in self._active:   # recursion through the call graph
      return {UNKNOWN}
    self._active.add(key)
    try:
      return self._cap(self._resolve(name, scope))
    finally:
      self._active.discard(key)

  def _resolve(self, name: str, scope: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(scope):
      if node is not scope and self.scope(node) is not scope:
        continue   # assignments of nested functions
      if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        out |= self.values(node.value, scope)
      elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
          and node.target.id == name and node.value is not None:
        out |= self.values(node.value, scope)
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and name in _param_names(scope):
      out |= self._parameter(name, scope)
    elif not out and scope is not self.tree:
      out = self._resolve(name, self.scope(scope))   # a closure or module-level name
    return out or {UNKNOWN}

  def _parameter(self, name: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    out: set[str] = set()
    index = next((i for i, p in enumerate(positional) if p.arg == name), None)
    if index is not None:
      defaults = a.defaults
      first_default = len(positional) - len(defaults)
      if index >= first_default:
        out |= self.values(defaults[index - first_default], self.scope(fn))
    elif any(p.arg == name for p in a.kwonlyargs):
      for p, d in zip(a.kwonlyargs, a.kw_defaults):
        if p.arg == name and d is not None:
          out |= self.values(d, self.scope(fn))
    else:
      return out
    method = isinstance(self.parent.get(fn), ast.ClassDef)
    for call in self.calls:
      # The module's own calls of ``fn``: ``fn(...)``, or ``self.fn(...)`` for a method (not ``x.get(...)``).
      func = call.func
      if method:
        if not (isinstance(func, ast.Attribute) and func.attr == fn.name and isinstance(func.value, ast.Name)
                and func.value.id in ("self", "cls")):
          continue
      elif not (isinstance(func, ast.Name) and func.id == fn.name):
        continue
      arg = next((k.value for k in call.keywords if k.arg == name), None)
      if arg is None and index is not None and not any(isinstance(x, ast.Starred) for x in call.args):
        i = index - (1 if method else 0)
        if 0 <= i < len(call.args):
          arg = call.args[i]
      if arg is not None:
        out |= self.values(arg, self.scope(call))
    return out


def _param_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
  a = fn.args
  names = {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
  return names | {p.arg for p in (a.vararg, a.kwarg) if p is not None}


def messages(source: str, filename: str = "<string>") -> list[Message]:
  """Every possible text of every ``raise X(...)`` message in ``source``."""
  tree = ast.parse(source, filename)
  module = _Module(tree)
  out = []
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
      continue
    scope = module.scope(node)
    parts = [module.values(a, scope) for a in node.exc.args]
    parts += [module.values(k.value, scope) for k in node.exc.keywords]
    texts = set()
    for p in parts:
      texts |= p
    for text in sorted(texts):
      if text != UNKNOWN:
        out.append(Message(f"{filename}:{node.lineno}", text))
  return out


def library_messages() -> list[Message]:
  out = []
  for path in sorted(PACKAGE.rglob("*.py")):
    out += messages(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
  return out


# ----------------------------------------------------------------------------- the config tree


def _configs_module():
  sys.path.insert(0, str(CONFIGS))
  try:
    return importlib.import_module("common")
  finally:
    sys.path.remove(str(CONFIGS))


def _model_fields_in_configs() -> set[str]:
  """``model.<x>[.<y>]`` paths that some file in configs/ sets."""
  out = set()
  for path in CONFIGS.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
        chain = []
        n = node
        while isinstance(n, ast.Attribute):
          chain.append(n.attr)
          n = n.value
        chain.reverse()   # [model, x, ...] with the root name dropped
        if len(chain) >= 2 and chain[0] == "model":
          out.add(".".join(chain))
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
          and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "model":
        out |= {f"model.{k.arg}" for k in node.keywords if k.arg}
  return out


def make_options(package: str) -> set[str]:
  """Keyword parameters of ``make`` in the modules of ``package`` (``method.kwargs`` keys)."""
  pkg = importlib.import_module(package)
  keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  out = set()
  for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
    make = getattr(importlib.import_module(f"{package}.{info.name}"), "make", None)
    if callable(make):
      out |= {n for n, p in inspect.signature(make).parameters.items() if p.kind in keyword}
  return out


class ConfigPaths:
  """Which dotted paths name a field of ``configs/common.base()`` (with the rules for open dicts)."""

  def __init__(self):
    self.base = _configs_module().base()
    self._model = None
    self._sources = None
    self._methods = None

  @property
  def source_params(self) -> set[str]:
    if self._sources is None:
      from hetlora import data
      self._sources = {p for fn in data.SOURCES.values() for p in inspect.signature(fn).parameters}
    return self._sources

  @property
  def method_params(self) -> set[str]:
    if self._methods is None:
      self._methods = make_options("hetlora.methods")
    return self._methods

  @property
  def model_fields(self) -> set[str]:
    if self._model is None:
      self._model = _model_fields_in_configs()
    return self._model

  def exists(self, path: str) -> bool:
    parts = path.split(".")
    if parts[:2] in (["data", "source_kwargs"], ["data", "test_kwargs"]) and len(parts) > 2:
      return len(parts) == 3 and parts[2] in self.source_params
    if parts[:2] == ["method", "kwargs"] and len(parts) > 2:
      return len(parts) == 3 and parts[2] in self.method_params
    if parts[0] == "model" and any(f == path or f.startswith(path + ".") for f in self.model_fields):
      return True
    node = self.base
    for part in parts:
      if not hasattr(node, "keys") or part not in node:
        return False
      node = node[part]
    return True


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def config_paths():
  return ConfigPaths()


@pytest.fixture(scope="module")
def named():
  return [m for m in library_messages() if m.paths()]


def test_extractor_finds_library_messages(named):
  # The walk reaches the data sources' and the ranks' messages (a guard against a silent no-op).
  where = {m.where.split(":")[0] for m in named}
  assert {"hetlora/data/sources.py", "hetlora/ranks.py", "hetlora/lora.py"} <= where, sorted(where)


def test_every_named_config_path_exists(named, config_paths):
  bad = [f"{m.where}: {p!r} in {m.text!r}" for m in named for p in m.paths() if not config_paths.exists(p)]
  assert not bad, "error messages name config paths that configs/common.base() lacks:\n" + "\n".join(bad)


def test_messages_that_name_a_path_give_a_hint(named):
  bad = [f"{m.where}: {m.text!r}" for m in named if not HINT_RE.search(m.text)]
  assert not bad, "messages name a config path without saying what to set (=, must, choose, set):\n" + \
      "\n".join(bad)


BAD_SOURCE = '''
def _require(path, field, what):
  if path is None:
    raise FileNotFoundError(f"no {what}; set config.data.source_kwargs.{field}.")

def load(path, field="path"):
  return _require(path, field, "file")

def tok(max_len):
  if max_len < 1:
    raise ValueError(f"max_len={max_len} must be >= 1; set config.data.max_len, e.g. 64.")
  hint = "set config.client.chunk_sizes"
  raise TypeError("bad chunks; " + hint)

def nested():
  load(None, field="data_dirs")
  raise KeyError(f"no option; set method.kwargs.{'rank_r' + 'ank'}")
'''


def test_extractor_catches_wrong_paths(config_paths):
  msgs = messages(BAD_SOURCE, "fake.py")
  found = {(m.where, p) for m in msgs for p in m.paths()}
  assert ("fake.py:11", "data.max_len") in found
  assert ("fake.py:13", "client.chunk_sizes") in found         # through a local variable
  assert ("fake.py:4", "data.source_kwargs.path") in found     # a parameter's default, one call away
  assert ("fake.py:4", "data.source_kwargs.data_dirs") in found  # a keyword argument two calls away
  assert ("fake.py:17", "method.kwargs.rank_rank") in found
  invalid = {p for _, p in found if not config_paths.exists(p)}
  assert invalid == {"data.max_len", "client.chunk_sizes", "data.source_kwargs.data_dirs",
                     "method.kwargs.rank_rank"}
  assert all(HINT_RE.search(m.text) for m in msgs if m.paths())
  assert not HINT_RE.search("lora.pattern matches no kernel")


def test_config_path_rules(config_paths):
  ok = ["model.max_len", "data.source_kwargs", "data.source_kwargs.data_dir", "data.test_kwargs.split",
        "client.chunk_size", "method.kwargs.lam", "lora.r_max", "eval.every", "method.kwargs"]
  bad = ["data.max_len", "data.split", "data.data_dir", "data.path", "client.chunk_size.x",
         "data.source_kwargs.nope", "data.source_kwargs.path.x", "model.nope", "method.nope",
         "method.kwargs.nope", "client.pruning.lam"]
  assert [p for p in ok if not config_paths.exists(p)] == []
  assert [p for p in bad if config_paths.exists(p)] == []
  assert PATH_RE.findall("set config.model.max_len.") == ["model.max_len"]
  assert PATH_RE.findall("metadata.max_len or data.x") == ["data.x"]


def test_file_names_and_code_are_not_paths():
  text = ("a BERT directory holds model.safetensors; use replace(spec, local=method.local); see "
          "hetlora.data.sources or hetlora.client.vmap_backend; set lora.r_max or config.client.chunk_size "
          "(--config.server.rounds=3)")
  assert Message("x.py:1", text).paths() == ["lora.r_max", "client.chunk_size", "server.rounds"]
  src = "def get(kind):\n  raise ValueError(f'model.kind={kind!r}; choose one')\n" \
        "def f(c):\n  return c.get('dtype')\n"
  # ``c.get('dtype')`` is not a call of the module's ``get``: ``kind`` stays unknown.
  assert [m.text for m in messages(src)] == ["model.kind={}; choose one"]


def test_method_kwargs_are_the_options_of_make(tmp_path, monkeypatch):
  pkg = tmp_path / "fake_methods_pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "base.py").write_text("def helper(x): return x\n")
  (pkg / "pad.py").write_text("def make(*, padding='linear', weighting='examples', **rest): pass\n")
  (pkg / "kd.py").write_text("def make(group_ranks=(2, 4), temperature=1.0): pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert make_options("fake_methods_pkg") == {"padding", "weighting", "group_ranks", "temperature"}
  paths = ConfigPaths()
  paths._methods = make_options("fake_methods_pkg")
  assert paths.exists("method.kwargs.padding") and paths.exists("method.kwargs")
  assert not paths.exists("method.kwargs.rest") and not paths.exists("method.kwargs.padding.x")
