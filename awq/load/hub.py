"""Hugging Face hub reachability and the user cache directory.

``hub_available()`` answers "may we talk to the hub?" in well under a second: it honours the
usual offline switches and otherwise tries one TCP connect to ``huggingface.co:443``.  When the
hub cannot be reached it turns on ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` for the rest of the
process, so later ``datasets``/``transformers``/``huggingface_hub`` calls fail over at once
instead of retrying for minutes.

``cache_dir(*parts)`` is where converted artifacts (the offline corpus, the safetensors copy of a
GGUF model, ...) live: ``$AWQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/awq-sparsity``, else
``~/.cache/awq-sparsity``.  Never inside the repository.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from awq.util import env

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"
HUB_PORT = 443
OFFLINE_VARS: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}

# (host, port) -> reachable; one probe per process and address.
_PROBES: dict[tuple[str, int], bool] = {}


def _env_true(name: str) -> bool:
    return (env.get_str(name) or "").upper() in _TRUE


def offline_requested() -> bool:
    """True when one of ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` is set to 1/true."""
    return any(_env_true(v) for v in OFFLINE_VARS)


def _hub_address() -> tuple[str, int]:
    """``$AWQ_HUB_HOST`` (``host`` or ``host:port``) or ``huggingface.co:443``."""
    spec = env.get_str("AWQ_HUB_HOST") or ""
    if not spec:
        return HUB_HOST, HUB_PORT
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    return spec, HUB_PORT


def force_offline() -> None:
    """Switch the HF libraries to offline mode for the rest of this process.

    Sets the environment variables (read by libraries imported later) and, for libraries already
    imported, their module-level flags, which were read from the environment at import time.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True
    dconfig = sys.modules.get("datasets.config")
    if dconfig is not None:
        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(dconfig, attr):
                setattr(dconfig, attr, True)


def _probe(addr: tuple[str, int], timeout: float) -> bool:
    """One TCP connect to ``addr``; DNS resolution included in ``timeout`` (run in a daemon thread,
    since ``getaddrinfo`` ignores socket timeouts and a dead resolver can hang for many seconds)."""
    result: list[object] = []

    def attempt() -> None:
        try:
            with socket.create_connection(addr, timeout=timeout):
                result.append(True)
        except OSError as exc:  # refused, unreachable, DNS failure, timeout
            result.append(exc)

    t = threading.Thread(target=attempt, name="awq-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    outcome = result[0] if result else TimeoutError(f"no answer within {timeout:g} s")
    if outcome is True:
        return True
    log.info("Hugging Face hub %s:%d unreachable (%s); working offline", addr[0], addr[1], outcome)
    return False


def hub_available(timeout: float = 0.5) -> bool:
    """Whether the Hugging Face hub can be used from this process.

    False at once when an offline switch is set.  Otherwise one TCP connect to the hub (or to
    ``$AWQ_HUB_HOST``) with ``timeout`` seconds; the answer is cached per process and address.
    When unreachable, :func:`force_offline` is applied so later hub calls fail over immediately.
    """
    if offline_requested():
        return False
    addr = _hub_address()
    ok = _PROBES.get(addr)
    if ok is None:
        ok = _probe(addr, timeout)
        _PROBES[addr] = ok
    if not ok:
        force_offline()
    return ok


def reset_hub_probe() -> None:
    """Forget cached probe results (for tests)."""
    _PROBES.clear()
