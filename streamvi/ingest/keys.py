"""ZeroMQ CURVE keys: generate them (``streamvi keys``) and load them for the service.

With ``curve_secret_key`` set, the service's receiving sockets require CURVE: traffic is
encrypted and only producers whose public key lies in ``curve_allowed_clients`` get in.
Key files are ZeroMQ's own certificate format (``zmq.auth``), so other ZeroMQ tools read them.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from streamvi.errors import ConfigError


def generate_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) in ``directory``.

    Returns
    -------
    (public_path, secret_path)
    """
    if not zmq.has("curve"):
        raise ConfigError("this libzmq was built without CURVE support; install pyzmq wheels "
                          "from PyPI (they include it)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain file name such as 'server' or "
                          "'indexamajig-node3'")
    public, secret = zmq.auth.create_certificates(str(d), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_secret_key(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    p = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"curve_secret_key {p}: cannot read a secret key ({exc}); create one "
                          "with `streamvi keys --out DIR --name server`") from None
    if secret is None:
        raise ConfigError(f"curve_secret_key {p}: holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key of a ``.key`` or ``.key_secret`` file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read a public key ({exc})") from None
    return public


def load_allowed_clients(directory: str | os.PathLike) -> list[bytes]:
    """Public keys of every ``*.key`` file in ``directory`` (the producers let in)."""
    d = Path(directory) if directory else None
    if d is None or not d.is_dir():
        raise ConfigError(f"curve_allowed_clients {directory!r}: not a directory; put the "
                          "producers' public .key files in one and name it")
    keys = [load_public_key(p) for p in sorted(d.glob("*.key"))]
    if not keys:
        raise ConfigError(f"curve_allowed_clients {d}: no *.key files: no producer could "
                          "connect")
    return keys
