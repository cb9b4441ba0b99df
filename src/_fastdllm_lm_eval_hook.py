"""Makes `lm_eval --model fastdllm` work without editing lm-eval (lm-eval 0.4 has no plugin
discovery for models). Installed with fastdllm as `fastdllm_lm_eval.pth`, which imports this
module at interpreter start-up; it only adds an import hook and imports nothing else. When
lm-eval imports its own model table (`lm_eval.models`), the hook adds one lazy registry entry,
"fastdllm" -> "fastdllm.evaluation.harness:FastDLLMLM", so fastdllm (and torch) are imported
only when that model is asked for. Without lm-eval installed the hook never fires.
"""

from __future__ import annotations

import sys

MODEL_NAME = "fastdllm"
MODEL_TARGET = "fastdllm.evaluation.harness:FastDLLMLM"
_WATCHED = "lm_eval.models"


def register() -> None:
    """Add the lazy "fastdllm" entry to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _LmEvalModelsFinder:
    """A meta-path finder that finds nothing itself: for `lm_eval.models` it asks the other
    finders for the real spec and wraps its loader so `register()` runs right after the module."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if _LmEvalModelsFinder in sys.meta_path:
        return
    if _WATCHED in sys.modules:  # lm-eval was imported before the hook: register now
        register()
        return
    sys.meta_path.insert(0, _LmEvalModelsFinder)


install()
