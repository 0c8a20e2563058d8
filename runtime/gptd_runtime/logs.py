"""Process logging: our own lines, and third-party lines that mean nothing alarming to an operator kept out of
the default level.

What is quietened, and why it is safe:
* transformers' continuous-batching logger ("ContinuousBatchingLogger") narrates its set-up at INFO: the
  cache memory *it* would have picked ("Memory available for cache allocation: N MB", next to our own figure),
  flash-attention advice, cuda-graph choices, its generated seed. Raised to WARNING: its warnings and errors
  still show.
* transformers' "We strongly recommend passing in an `attention_mask`" / "The attention mask is not set"
  advice: every forward pass here is masked correctly (continuous batching packs requests itself; the
  classifiers pass the tokenizer's mask; embeddings run unpadded). Only those two messages are dropped.
* the "Loading weights" progress bar (a terminal widget, garbage in a pod log).
* uvicorn's access lines for probes and scrapes (one per probe every few seconds, forever).
At DEBUG (`--log-level debug`) nothing is quietened.
"""

from __future__ import annotations

import logging

PROBE_PATHS = ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics")
_ADVICE_PREFIXES = ("We strongly recommend passing in an `attention_mask`", "The attention mask is not set",
                    "The attention mask and the pad token id were not set")
CB_LOGGER = "ContinuousBatchingLogger"


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not str(record.msg).startswith(_ADVICE_PREFIXES)


class _DropProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn.access args: (client, method, path, http_version, status)
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) >= 3 and str(args[2]).split("?", 1)[0] in PROBE_PATHS)


_ADVICE = _DropAdvice()
_PROBES = _DropProbes()


def configure(level: str) -> None:
    """Root logging for the server process, and the third-party quietening above unless level is DEBUG."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party(debug=numeric == logging.DEBUG)


def quiet_third_party(debug: bool = False) -> None:
    if debug:
        return
    logging.getLogger(CB_LOGGER).setLevel(logging.WARNING)
    for name in ("transformers", "transformers.modeling_utils", "transformers.generation.utils"):
        logger = logging.getLogger(name)
        if _ADVICE not in logger.filters:
            logger.addFilter(_ADVICE)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # transformers not installed: nothing to quieten
        pass


def quiet_access_log() -> None:
    """Call after uvicorn configured its loggers."""
    access = logging.getLogger("uvicorn.access")
    if _PROBES not in access.filters:
        access.addFilter(_PROBES)
