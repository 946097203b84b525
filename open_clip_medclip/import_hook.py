"""`AfterImport`: a meta-path finder that calls `callback(name, module)` right after each watched module has run.

The one implementation of the post-import hook: `open_clip_medclip/__init__.py` uses it to register the MedCLIP
models right after `import open_clip`, and the opt-in autoload (`autoload.py`) writes this file's text, followed
by a few lines that install it, into site-packages. So this module imports only `importlib.abc` and `sys`, never
anything from open_clip_medclip, and has no `from __future__` line.

The finder asks the finders after it for a watched module's spec and wraps that spec's loader, so the callback
runs right after the module body; a name stops being watched once its module has been executed (a bare
`importlib.util.find_spec(name)` leaves it watched), and the finder removes itself when none is left. Names
already in `sys.modules` are not watched (call the callback for those yourself).
"""
import importlib.abc
import sys


class AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, names, callback):
        self.pending = set(names) - set(sys.modules)
        self.callback = callback
        self.searching = set()

    def find_spec(self, name, path=None, target=None):
        # `searching`: another hook of this kind (the package's own and the autoload's) asks the finders after it,
        # including this one; answering None while this one is already searching for `name` stops the recursion
        if name not in self.pending or name in self.searching:
            return None
        spec = None
        self.searching.add(name)
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self.searching.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            self.pending.discard(name)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback(name, module)

        spec.loader.exec_module = exec_then_call
        return spec

    @classmethod
    def install(cls, names, callback):
        """Put a finder for the `names` not yet imported first on `sys.meta_path`; returns it (None: all imported)."""
        finder = cls(names, callback)
        if not finder.pending:
            return None
        sys.meta_path.insert(0, finder)
        return finder
