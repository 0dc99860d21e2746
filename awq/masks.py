"""Compatibility names for code written against the old single-module ``awq.masks``.

New code imports from the modules that own the concepts: :mod:`awq.bitpack` (pack/unpack),
:mod:`awq.pattern_store` (PatternStore, StoreRows, StoreWriter, errors, layout) and
:mod:`awq.recording` (record_masks, MaskRecorder, observers).
"""
from awq.bitpack import pack, unpack  # noqa: F401
from awq.pattern_store import (  # noqa: F401
    BIT_ORDER, FORMAT_NAME, FORMAT_VERSION, IDENTITY_KEYS, INPUT_KIND, ROW_LAYOUT, PatternStore, StoreError,
    StoreMismatchError, StoreRows, StoreWriter, layer_file,
)
from awq.recording import MaskRecorder, record_masks  # noqa: F401
