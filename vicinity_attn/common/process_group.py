"""Layers that hold a ``torch.distributed`` process group (context parallelism): copying and saving.

A process group is a handle to a communicator, not state (like a device): it cannot be pickled or
deep-copied, and it means nothing in another process. So a layer's ``group`` is kept out of what is
copied and saved:

- ``copy.deepcopy(layer)`` (e.g. an EMA copy) shares the original's group: the copy runs context
  parallel over the same ranks.
- ``pickle`` / ``torch.save(layer)`` stores ``group=None``: the loaded layer runs on one process until
  its ``group`` attribute is set again.
- ``state_dict()`` never held it.
"""
from __future__ import annotations

import copy

GROUP_ATTRIBUTE = "group"


class HoldsProcessGroup:
    """Mixin for an ``nn.Module`` with a ``group`` attribute (module docstring)."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if state.get(GROUP_ATTRIBUTE) is not None:
            state = dict(state)
            state[GROUP_ATTRIBUTE] = None   # a communicator handle is not saved
        return state

    def __deepcopy__(self, memo: dict):
        group = self.__dict__.get(GROUP_ATTRIBUTE)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        state = {name: value if name == GROUP_ATTRIBUTE else copy.deepcopy(value, memo)
                 for name, value in self.__dict__.items()}
        clone.__setstate__(state)
        if group is not None:
            clone.__dict__[GROUP_ATTRIBUTE] = group   # shared, not copied
        return clone
