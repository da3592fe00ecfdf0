"""Low-level HDF5 reading helpers for :mod:`layerscope.h5io` (no high-level h5py objects).

A shard holds thousands of small datasets; h5py's high-level objects cost more per dataset than
the read itself, so the shard reader opens objects and attributes by index through h5py's
low-level bindings. These helpers depend on nothing else in the package.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5o, h5t, h5z

__all__ = ["_has_fletcher32", "_read_attrs"]


def _has_fletcher32(dsid: h5d.DatasetID) -> bool:
    """Whether a dataset is stored with the Fletcher-32 filter (low-level: no high-level objects)."""
    return dsid.get_create_plist().get_filter_by_id(h5z.FILTER_FLETCHER32) is not None


def _read_attrs(oid: h5o.ObjectID, n: int) -> dict[str, Any]:
    """The ``n`` attributes of an object, as ``dict(h5py_object.attrs.items())`` returns them.

    Each value is converted exactly as h5py 3's ``AttributeManager.__getitem__`` does (top-level
    array types unfolded, variable-length strings decoded with ``surrogateescape``, 0-d arrays
    unwrapped), opened by index instead of by name and without h5py's per-call lock and object
    lookups, which cost more than the read for the few small attributes of a statistics group;
    ``tests/test_h5io.py`` compares the two on every attribute type."""
    out: dict[str, Any] = {}
    for i in range(n):
        attr = h5a.open(oid, index=i)
        name = attr.name.decode("utf-8")
        shape, dtype = attr.shape, attr.dtype
        if shape is None:  # empty dataspace
            out[name] = h5py.Empty(dtype)
            continue
        htype = h5t.py_create(dtype)
        if dtype.subdtype is not None:
            dtype, subshape = dtype.subdtype
            shape = shape + subshape
        arr = np.zeros(shape, dtype=dtype, order="C")
        attr.read(arr, mtype=htype)
        string_info = h5t.check_string_dtype(dtype)
        if string_info and string_info.length is None:
            arr = np.array([b.decode("utf-8", "surrogateescape") for b in arr.flat], dtype=dtype).reshape(arr.shape)
        out[name] = arr[()] if arr.ndim == 0 else arr
    return out
