"""Who answers an endpoint's calls and the key to ask it with, for every stage that calls one.

Our own endpoint (an EndpointConfig without base_url) is keyed by the serve section's key and is
known by what it serves (its address changes from run to run); any other by its address.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import SecretStr

from synthpert.config import Config, EndpointConfig


def api_key(endpoint: EndpointConfig, cfg: Config) -> SecretStr | None:
    """The endpoint's key from its env var (our own endpoint: the serve key), kept out of reprs."""
    key = endpoint.api_key()
    if key is None and endpoint.base_url is None:
        key = os.environ.get(cfg.serve.api_key_env)
    return SecretStr(key) if key else None


def endpoint_identity(endpoint: EndpointConfig, cfg: Config) -> Any:
    """Who answers the endpoint's calls: its address, or for our own endpoint what it serves."""
    return endpoint.base_url if endpoint.base_url is not None else cfg.serve.identity()
