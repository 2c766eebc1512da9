"""CURVE on every ZMQ socket: keys on disk, the allow list, socket setup.

With `[security] curve_dir` set in kimi.toml every daemon has a name (the
coordinator is "coordinator", a worker its name in the config) and a keypair:

  <curve_dir>/<name>.key_secret     this machine's own secret key (mode 0600,
                                    never leaves the machine that made it)
  <curve_dir>/public/<name>.key     public keys of every daemon in the cluster:
                                    the allow list, and the keys clients use to
                                    check the server they connect to

Sockets that bind (worker control and data, coordinator result) are CURVE
servers: a ZAP handler refuses every client whose public key is not in
`public/` (read again at every handshake, so adding or removing a file needs
no restart), before any of its messages reach the daemon. Sockets that connect
are CURVE clients that know the server's public key from the owner of the
address. `kimi keys` makes the files; SECURITY.md says how to share them.

Without curve_dir nothing here runs and the sockets are plain TCP.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from . import log
from .config import Config

COORDINATOR = "coordinator"
PUBLIC_DIR = "public"
SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"
Z85_KEY_CHARS = 40
REFUSAL_LOG_INTERVAL_S = 60.0  # a refused peer reconnects every 100 ms: log it once a minute
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

logger = log.get_logger()


class SecurityError(ValueError):
    """Keys that are missing, unreadable or mismatched; the message says which file and what to do."""


def daemon_names(cfg: Config) -> list[str]:
    """Every key owner of the cluster: the coordinator, then the workers."""
    return [COORDINATOR, *(w.name for w in cfg.workers)]


def _check_name(cfg: Config, name: str) -> None:
    if COORDINATOR in (w.name for w in cfg.workers):
        raise SecurityError(f"{cfg.path}: a worker is named {COORDINATOR!r}, which names the coordinator's key")
    if name not in daemon_names(cfg):
        raise SecurityError(f"{cfg.path}: no daemon named {name!r} (known: {', '.join(daemon_names(cfg))})")
    if not _NAME_RE.fullmatch(name):
        raise SecurityError(f"{cfg.path}: {name!r} cannot name a key file; use letters, digits, '.', '_' and '-'")


def curve_dir(cfg: Config) -> Path:
    if cfg.security.curve_dir is None:
        raise SecurityError(f'{cfg.path}: set [security] curve_dir = "..." to use CURVE keys')
    return cfg.security.curve_dir


def secret_path(cfg: Config, name: str) -> Path:
    return curve_dir(cfg) / f"{name}{SECRET_SUFFIX}"


def public_path(cfg: Config, name: str) -> Path:
    return curve_dir(cfg) / PUBLIC_DIR / f"{name}{PUBLIC_SUFFIX}"


def create_keys(cfg: Config, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a fresh keypair for daemon `name`; returns (public, secret) paths."""
    _check_name(cfg, name)
    secret, public = secret_path(cfg, name), public_path(cfg, name)
    if not force:
        for p in (secret, public):
            if p.exists():
                raise SecurityError(
                    f"{p} already exists; pass --force to replace it "
                    "(then copy the new public key to every machine again)"
                )
    secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    public.parent.mkdir(exist_ok=True)
    secret.unlink(missing_ok=True)
    # Made 0600 before any key is written into it; pyzmq's writer keeps the mode.
    os.close(os.open(secret, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    made_public, _ = zmq.auth.create_certificates(secret.parent, name)
    os.replace(made_public, public)
    return public, secret


def _read_key(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{path}: not a readable CURVE key file ({e})") from None
    keys = {"public": public_key, "secret": secret_key} if secret else {"public": public_key}
    for what, key in keys.items():
        if key is None or len(key) != Z85_KEY_CHARS:
            raise SecurityError(f"{path}: no valid {what} key in it (expected {Z85_KEY_CHARS} Z85 characters)")
        try:
            z85.decode(key)
        except (ValueError, KeyError, TypeError):
            raise SecurityError(f"{path}: the {what} key is not Z85 text") from None
    return public_key, secret_key


def load_public_keys(directory: Path) -> dict[bytes, str]:
    """The allow list: public key -> the name of the file it came from."""
    if not directory.is_dir():
        raise SecurityError(f"{directory} does not exist: copy every daemon's public key there (see SECURITY.md)")
    keys = {}
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        public_key, _ = _read_key(path, secret=False)
        keys[public_key] = path.stem
    return keys


class Curve:
    """One daemon's CURVE identity, the cluster's allow list, and its ZAP handler."""

    def __init__(self, cfg: Config, me: str, *, peers: tuple[str, ...] = ()):
        """Load this daemon's keypair; `peers` are servers whose public keys
        must be present already (checked now, so a missing file fails at start)."""
        _check_name(cfg, me)
        self.cfg = cfg
        self.me = me
        self.public_dir = curve_dir(cfg) / PUBLIC_DIR
        path = secret_path(cfg, me)
        if not path.exists():
            raise SecurityError(
                f"{path} is missing: run `kimi keys --config {cfg.path} --name {me}` on this machine, "
                f"then copy {public_path(cfg, me)} to every other machine (see SECURITY.md)"
            )
        if os.name == "posix" and path.stat().st_mode & 0o077:
            logger.warning("secret_key_readable_by_others", path=str(path), hint=f"chmod 600 {path}")
        self.public, self.secret = _read_key(path, secret=True)
        own = public_path(cfg, me)
        if not own.exists() or _read_key(own, secret=False)[0] != self.public:
            problem = "is missing" if not own.exists() else f"does not hold the public key of {path}"
            raise SecurityError(f"{own} {problem}: put the public-key line of {path} there (kimi keys writes both)")
        self.allowed = load_public_keys(self.public_dir)
        for peer in peers:
            self.server_key(peer)
        self._auth: ThreadAuthenticator | None = None
        self._lock = threading.Lock()
        self._refused: dict[bytes, float] = {}
        self._log_context: dict = {}

    @classmethod
    def for_daemon(cls, cfg: Config, me: str, *, peers: tuple[str, ...] = ()) -> Curve | None:
        """None when the config has no curve_dir: plain sockets."""
        return None if cfg.security.curve_dir is None else cls(cfg, me, peers=peers)

    # -- the allow list, enforced by ZAP -------------------------------------------------

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler for `ctx`. Call it before binding any server
        socket: a CURVE server with no handler would take any client key."""
        self._log_context = structlog.contextvars.get_contextvars()  # the ZAP thread logs as this daemon
        self._auth = ThreadAuthenticator(ctx, log=_QuietLog())
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def stop(self) -> None:
        """Stop the ZAP handler; before the context is terminated."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may the client with this (Z85) public key connect?"""
        with self._lock:
            # Read at every handshake: a key copied in or removed counts without a restart.
            try:
                self.allowed = load_public_keys(self.public_dir)
            except SecurityError as e:
                self.allowed = {}
                logger.error("allow_list_unreadable", error=str(e), **self._log_context)
            name = self.allowed.get(key)
            if name is not None:
                logger.info("curve_peer_allowed", peer=name, **self._log_context)
                return True
            now = time.monotonic()
            if now - self._refused.get(key, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
                self._refused[key] = now
                logger.warning(
                    "curve_peer_refused",
                    key=key.decode("ascii", "replace"),
                    hint=f"not in {self.public_dir}; a cluster member's key belongs there",
                    **self._log_context,
                )
            return False

    # -- sockets ----------------------------------------------------------------------------

    def server(self, sock: zmq.Socket) -> None:
        """Configure a socket that binds; before bind."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, server_name: str) -> None:
        """Configure a socket that connects to daemon `server_name`; before connect."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_key(server_name)

    def server_key_at(self, address: str) -> bytes:
        """The public key of the daemon that binds `address`."""
        return self.server_key(owner_of(self.cfg, address))

    def server_key(self, name: str) -> bytes:
        path = public_path(self.cfg, name)
        if not path.exists():
            raise SecurityError(f"{path} is missing: copy it from the machine that runs {name} (see SECURITY.md)")
        return _read_key(path, secret=False)[0]


def owner_of(cfg: Config, address: str) -> str:
    """The daemon that binds `address`: the coordinator's result socket or a worker's data socket."""
    if address == cfg.coordinator.result_address:
        return COORDINATOR
    for w in cfg.workers:
        if address == w.data_address:
            return w.name
    raise SecurityError(
        f"{address} is neither the coordinator's result address nor a worker's data address "
        f"in {cfg.path}; with CURVE on, a daemon only connects to daemons of its config"
    )


class _QuietLog:
    """pyzmq's authenticator logs every handshake through `logging`; ours go
    through `Curve.callback`, so only its errors are kept."""

    def debug(self, *args) -> None:
        pass

    def error(self, msg: str, *args) -> None:
        logger.error("zap", message=msg % args)
