"""Build hook only (the metadata is in setup.cfg): ``twistd e2a`` from an editable install.

twistd finds its plugins by scanning every ``twisted/plugins`` directory on ``sys.path``. A wheel
installs ``twisted/plugins/e2a_plugin.py`` into site-packages, but setuptools' editable install
(``pip install -e .``) maps the project's packages through an import hook rather than a path
entry, so twistd never sees the working tree's ``twisted/plugins`` and answers
``Unknown command: e2a``. The editable wheel therefore also carries a copy of the plugin module
(small, and importing nothing from e2a: it only names ``e2a.tap``, which the import hook then
finds in the working tree). The two editable modes that do put a path entry on ``sys.path``
(``compat`` and ``strict``) need no copy and get none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from setuptools import setup

PLUGIN = "twisted/plugins/e2a_plugin.py"
cmdclass: dict[str, Any] = {}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools without PEP 660 support: nothing to adjust
    editable_wheel = None

if editable_wheel is not None:

    class _WithPlugin:
        """An editable-wheel strategy that also writes the twistd plugin module into the wheel."""

        def __init__(self, inner: Any, plugin: Path) -> None:
            self.inner = inner
            self.plugin = plugin

        def __enter__(self) -> _WithPlugin:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self.inner.__exit__(*exc)

        def __call__(self, wheel: Any, files: Any, mapping: Any) -> None:
            self.inner(wheel, files, mapping)
            wheel.writestr(PLUGIN, self.plugin.read_bytes())

    class EditableWheelWithPlugin(editable_wheel):  # type: ignore[misc, valid-type]
        def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:
            strategy = super()._select_strategy(*args, **kwargs)
            if type(strategy).__name__ in ("_StaticPth", "_LinkTree"):
                return strategy  # the working tree (or a link tree) is on sys.path already
            return _WithPlugin(strategy, Path(self.project_dir, PLUGIN))

    if hasattr(editable_wheel, "_select_strategy"):
        cmdclass["editable_wheel"] = EditableWheelWithPlugin

setup(cmdclass=cmdclass)
