"""Everything but one file is declared in pyproject.toml; this adds `llmlab_lm_eval.pth` to site-packages.

That file lets the unmodified `lm_eval` command find `--model llmlab` (see llmlab_lm_eval_hook.py).
setuptools has no setting that puts a file at the top of site-packages in both kinds of install, so
build_py writes it: into build_lib for a wheel (`pip install .`, `pip wheel .`), and for an editable
install (`pip install -e .`, PEP 660) into the folder that setuptools packs as the editable wheel,
which is the `install` command's install_lib (setuptools ignores build_lib there, and never installs
data_files into an editable wheel). Its name sorts after setuptools' `__editable__.*.pth`, which
must run first to make the hook module importable from the source tree.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "llmlab_lm_eval.pth"
HOOK = "try:\n import llmlab_lm_eval_hook\n llmlab_lm_eval_hook.install()\nexcept Exception:\n pass"
# site runs a .pth line that starts with "import"; the try keeps a broken install from printing at every start
PTH_LINE = f"import sys; exec({HOOK!r})"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        folder = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.mkpath(folder)
        Path(folder, PTH_NAME).write_text(PTH_LINE + "\n", encoding="utf-8")


setup(cmdclass={"build_py": build_py_with_pth})
