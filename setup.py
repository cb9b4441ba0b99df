"""Installs `fastdllm_lm_eval.pth` next to the package (site-packages) in regular and editable
installs: the start-up hook that lets `lm_eval --model fastdllm` find our model (see
src/_fastdllm_lm_eval_hook.py and docs/evaluation.md). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "fastdllm_lm_eval.pth"
SOURCE = Path("src") / PTH


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    # the editable wheel is assembled from this directory (dist-info, namespace .pth files)
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH).write_text(SOURCE.read_text())


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
