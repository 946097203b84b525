"""Failing shard sources: which URLs are remote, the retry/stop policy (`--medclip-shard-*`), the stop error."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import UserError
from ..options import MedclipOptions


class ShardSourceError(UserError):
    """The shard source failed past the `--medclip-shard-*` budget: the run stops (exit code 3).

    Raised in a loader worker, it reaches the main process through the DataLoader, which wraps its message in the
    worker's traceback; `ShardSourceError.line(exc)` recovers the one line.
    """

    exit_code = 3

    @staticmethod
    def line(exc: BaseException) -> str:
        lines = [part.strip() for part in str(exc).splitlines() if part.strip()]
        marker = f"{ShardSourceError.__name__}: "
        for part in reversed(lines):
            if marker in part:
                return part.split(marker, 1)[1].strip()
        return lines[-1] if lines else ShardSourceError.__name__


def is_remote_url(url: str) -> bool:
    """Whether reading `url` goes over a network or a command (http(s), `pipe:`, fsspec), where a retry can help."""
    scheme = urlparse(url).scheme
    return not (scheme in ("", "file") or len(scheme) == 1)


@dataclass(frozen=True)
class ShardFailurePolicy:
    """`--medclip-shard-*` (their help says what each does): how remote shard reads retry, when failed shards stop
    the run; `share` is a loader worker's share of the epoch's shards. Local files are read once (a retry cannot
    change them) and never stop the run this way; a whole pass over a worker's shards without one sample stops it
    whatever the source (otherwise `with_epoch` would repeat it forever).
    """

    retries: int
    timeout: float
    backoff: float
    max_failures: int
    max_skipped: float
    share: int = 1

    def wait(self, attempt: int) -> float:
        return min(60.0, self.backoff * 2 ** (attempt - 1))

    def budget(self) -> str:
        return f"{self.retries} retries, {self.timeout:g} s read timeout"

    @classmethod
    def from_args(cls, args=None, shards: int = 1) -> ShardFailurePolicy:
        """From the `--medclip-shard-*` options (`MedclipOptions`, their defaults where `args` lacks them);
        `shards`: the epoch's shards, shared by world size x loader workers."""
        options = MedclipOptions.from_args(args)
        given = {name: getattr(options, f"shard_{name}") for name in ("retries", "timeout", "backoff", "max_failures",
                                                                      "max_skipped")}
        for name, value in given.items():
            if value < 0 or (name == "max_failures" and value < 1):
                raise UserError(f"--medclip-shard-{name.replace('_', '-')} must be "
                                f"{'>= 1' if name == 'max_failures' else '>= 0'}, got {value}")
        readers = max(1, int(getattr(args, "world_size", 1) or 1)) * max(1, int(getattr(args, "workers", 1) or 1))
        return cls(**given, share=max(1, -(-shards // readers)))
