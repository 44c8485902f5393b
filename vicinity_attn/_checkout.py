"""A checkout run as it is (never installed) gets ``kernels/`` as ``vicinity_attn.kernels``, as an install
maps it: a GPU machine may run the source tree with nothing installed."""
import importlib.util
import sys
from pathlib import Path


def _mount_checkout_kernels() -> None:
    name = __name__.rpartition(".")[0] + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    root = Path(__file__).resolve().parent.parent / "kernels"
    if not (root / "vicinity" / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__.rpartition(".")[0]], "kernels", module)


_mount_checkout_kernels()
